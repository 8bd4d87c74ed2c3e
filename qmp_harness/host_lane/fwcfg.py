"""Read a ``fw_cfg`` file of a QEMU ``virt`` machine over qtest, with no guest code.

QEMU builds its ACPI tables when the machine is created, before any guest
instruction runs, and publishes them as the ``fw_cfg`` file
``etc/acpi/tables``.  Started with ``-accel qtest -qtest stdio``, QEMU takes
memory and MMIO commands on stdin; that is enough to drive ``fw_cfg``'s DMA
interface: write a ``FWCfgDmaAccess`` descriptor into guest RAM, write its
address to the DMA register, read the result back from RAM.

Layout (QEMU ``docs/specs/fw_cfg.rst``; the ``virt`` memory map): the device
sits at ``0x09020000`` with its DMA address register at ``+0x10``;
descriptors and the file directory are big-endian.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag

from construct import Array, Bytes, Int16ub, Int32ub, Int64ub, PaddedString, Struct

from qmp_harness.provision import QemuInstall

VIRT_FW_CFG_BASE = 0x0902_0000
DMA_REGISTER = VIRT_FW_CFG_BASE + 0x10
VIRT_RAM_BASE = 0x4000_0000
DESCRIPTOR_ADDR = VIRT_RAM_BASE
BUFFER_ADDR = VIRT_RAM_BASE + 0x1000
FILE_DIR_KEY = 0x0019
QTEST_TIMEOUT = 60.0


class FwCfgDmaControl(IntFlag):
    """``FWCfgDmaAccess.control`` bits; the selector goes in the upper 16 bits."""

    ERROR = 0x01
    READ = 0x02
    SKIP = 0x04
    SELECT = 0x08


SELECTOR_SHIFT = 16

DMA_ACCESS = Struct("control" / Int32ub, "length" / Int32ub, "address" / Int64ub)
FILE_ENTRY = Struct(
    "size" / Int32ub,
    "select" / Int16ub,
    "reserved" / Bytes(2),
    "name" / PaddedString(56, "ascii"),
)
FILE_COUNT = Int32ub


class FwCfgError(RuntimeError):
    """QEMU did not start in qtest mode, or fw_cfg did not hold what was asked for."""


@dataclass(frozen=True)
class FwCfgFile:
    """One entry of the fw_cfg file directory."""

    name: str
    select: int
    size: int


class QtestFwCfg:
    """A QEMU started in qtest mode, and the fw_cfg reads made through it."""

    def __init__(self, install: QemuInstall, machine_args: Sequence[str]) -> None:
        argv = [*install.argv(), *machine_args, "-accel", "qtest", "-qtest", "stdio",
                "-display", "none", "-serial", "none", "-monitor", "none", "-nodefaults"]
        self._proc = subprocess.Popen(
            argv, env=install.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self._argv = argv

    def _command(self, line: str) -> str:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except BrokenPipeError as exc:
            raise FwCfgError(f"QEMU left qtest before {line!r}: {self._stderr()}") from exc
        while True:
            reply = proc.stdout.readline()
            if not reply:
                raise FwCfgError(f"QEMU closed qtest at {line!r}: {self._stderr()}")
            if reply.startswith("IRQ"):
                continue
            if not reply.startswith("OK"):
                raise FwCfgError(f"qtest {line!r} answered {reply.strip()!r}, expected OK")
            return reply[2:].strip()

    def _stderr(self) -> str:
        self._proc.kill()
        _, err = self._proc.communicate(timeout=QTEST_TIMEOUT)
        return f"{' '.join(self._argv)}: {err.strip()[-2000:]}"

    def _write(self, address: int, data: bytes) -> None:
        self._command(f"write {address:#x} {len(data):#x} 0x{data.hex()}")

    def _read(self, address: int, length: int) -> bytes:
        return bytes.fromhex(self._command(f"read {address:#x} {length:#x}").removeprefix("0x"))

    def _dma_read(self, length: int, select: int | None) -> bytes:
        control = FwCfgDmaControl.READ
        if select is not None:
            control |= FwCfgDmaControl.SELECT
        word = int(control) | ((select or 0) << SELECTOR_SHIFT)
        self._write(DESCRIPTOR_ADDR,
                    DMA_ACCESS.build({"control": word, "length": length, "address": BUFFER_ADDR}))
        # The register takes the descriptor's address big-endian; writing it runs the DMA.
        self._write(DMA_REGISTER, DESCRIPTOR_ADDR.to_bytes(8, "big"))
        status = DMA_ACCESS.parse(self._read(DESCRIPTOR_ADDR, DMA_ACCESS.sizeof()))
        if status.control & FwCfgDmaControl.ERROR:
            raise FwCfgError(f"fw_cfg DMA read of selector {select} reported an error")
        return self._read(BUFFER_ADDR, length) if length else b""

    def files(self) -> list[FwCfgFile]:
        """The fw_cfg file directory."""
        count = FILE_COUNT.parse(self._dma_read(FILE_COUNT.sizeof(), FILE_DIR_KEY))
        raw = self._dma_read(count * FILE_ENTRY.sizeof(), None)
        entries = Array(count, FILE_ENTRY).parse(raw)
        return [FwCfgFile(e.name, e.select, e.size) for e in entries]

    def read_file(self, name: str) -> bytes:
        """The contents of fw_cfg file ``name``; FwCfgError when there is none."""
        for entry in self.files():
            if entry.name == name:
                return self._dma_read(entry.size, entry.select)
        raise FwCfgError(f"fw_cfg has no file {name!r}")

    def close(self) -> None:
        """Stop QEMU."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate(timeout=QTEST_TIMEOUT)


def read_fw_cfg_file(install: QemuInstall, machine_args: Sequence[str], name: str) -> bytes:
    """Start QEMU with ``machine_args`` in qtest mode and return fw_cfg file ``name``."""
    qtest = QtestFwCfg(install, machine_args)
    try:
        return qtest.read_file(name)
    finally:
        qtest.close()
