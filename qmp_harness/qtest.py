"""Drive a QEMU with no guest OS over the qtest protocol (DESIGN.md §11).

``-accel qtest -qtest unix:PATH`` makes QEMU connect to a socket we listen
on and accept one command per line: memory and MMIO reads and writes in the
guest-physical address space, ``clock_step``, ``endianness``.  Each command
gets one reply line, ``OK [value]`` or ``FAIL``/``ERR ...``; lines starting
``IRQ`` are asynchronous interrupt notices (only after ``irq_intercept_*``)
and are skipped.

:class:`Qtest` is the protocol; :meth:`Qtest.pipeline` sends a batch of
commands in one write and collects the replies in order (QEMU serves them in
order, and a posted MMIO write is ordered before a later read, checked on
this machine).  :class:`QtestMachine` starts ``qemu-system-aarch64 -M virt``
under qtest with shared memfd RAM, connects QMP (for ``system_reset``) and
the qtest socket.  :class:`PciBus` enumerates bus 0 over ECAM and assigns
memory BARs itself, since no firmware runs.

Typical use (inside a coroutine)::

    async with QtestMachine(install, QtestConfig(devices=["iommu-testdev,addr=0x2"])) as vm:
        bus = PciBus(vm.qtest)
        functions = await bus.setup()
        value = await vm.qtest.readl(functions[0].bars[0])
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from qemu.qmp import QMPClient, QMPError

from qmp_harness.provision import QemuInstall

log = logging.getLogger(__name__)

#: virt's high PCIe ECAM window and its 32-bit MMIO window (``-M virt``, checked by dumpdtb).
VIRT_ECAM = 0x40_1000_0000
VIRT_MMIO32 = (0x1000_0000, 0x3EFF_0000)
VIRT_RAM = 0x4000_0000
ECAM_BUS_SHIFT = 20
ECAM_SLOT_SHIFT = 15
ECAM_FUNCTION_SHIFT = 12
PCI_SLOTS = 32
NO_FUNCTION = 0xFFFF_FFFF
PCI_COMMAND = 0x04
PCI_CLASS_REVISION = 0x08
PCI_BAR0 = 0x10
PCI_BARS = 6
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
BAR_IO = 1 << 0
BAR_TYPE_64 = 0x4
BAR_TYPE_MASK = 0x6
BAR_FLAGS_MASK = 0xF
DWORD_MASK = 0xFFFF_FFFF

CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 60.0
QUIT_TIMEOUT = 10.0
DEFAULT_MEMORY_MIB = 256


class QtestError(RuntimeError):
    """QEMU refused a qtest command, closed the socket, or did not start."""


class Qtest:
    """The qtest line protocol over one connected stream (module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.commands = 0

    async def pipeline(self, lines: Sequence[str]) -> list[str]:
        """Send ``lines`` in one write; return each reply's value text ('' when none).

        :raises QtestError: a reply other than ``OK``, or the socket closed.
        """
        if not lines:
            return []
        self.writer.write(("\n".join(lines) + "\n").encode())
        self.commands += len(lines)
        replies: list[str] = []
        async with asyncio.timeout(REPLY_TIMEOUT):
            while len(replies) < len(lines):
                raw = await self.reader.readline()
                if not raw:
                    raise QtestError(f"qtest socket closed waiting for {lines[len(replies)]!r}")
                reply = raw.decode().rstrip("\n")
                if reply.startswith("IRQ"):
                    continue
                if reply != "OK" and not reply.startswith("OK "):
                    raise QtestError(f"qtest {lines[len(replies)]!r} -> {reply!r}, expected OK")
                replies.append(reply[3:])
        return replies

    async def command(self, line: str) -> str:
        """One command; its reply's value text.

        :raises QtestError: see :meth:`pipeline`.
        """
        return (await self.pipeline([line]))[0]

    async def _read(self, width: str, address: int) -> int:
        return int(await self.command(f"read{width} {address:#x}"), 16)

    async def readb(self, address: int) -> int:
        """One byte of guest-physical memory or MMIO."""
        return await self._read("b", address)

    async def readw(self, address: int) -> int:
        """A 16-bit little-endian value."""
        return await self._read("w", address)

    async def readl(self, address: int) -> int:
        """A 32-bit little-endian value."""
        return await self._read("l", address)

    async def readq(self, address: int) -> int:
        """A 64-bit little-endian value."""
        return await self._read("q", address)

    async def writeb(self, address: int, value: int) -> None:
        """Store one byte."""
        await self.command(f"writeb {address:#x} {value:#x}")

    async def writew(self, address: int, value: int) -> None:
        """Store a 16-bit value."""
        await self.command(f"writew {address:#x} {value:#x}")

    async def writel(self, address: int, value: int) -> None:
        """Store a 32-bit value."""
        await self.command(f"writel {address:#x} {value:#x}")

    async def writeq(self, address: int, value: int) -> None:
        """Store a 64-bit value."""
        await self.command(f"writeq {address:#x} {value:#x}")

    async def read(self, address: int, length: int) -> bytes:
        """``length`` bytes of guest memory."""
        reply = await self.command(f"read {address:#x} {length:#x}")
        return bytes.fromhex(reply.removeprefix("0x"))

    async def write(self, address: int, data: bytes) -> None:
        """Store ``data`` (nothing for empty data)."""
        if data:
            await self.command(write_line(address, data))

    async def memset(self, address: int, length: int, value: int = 0) -> None:
        """Fill ``length`` bytes with ``value``."""
        await self.command(f"memset {address:#x} {length:#x} {value:#x}")

    async def clock_step(self, nanoseconds: int | None = None) -> int:
        """Advance the virtual clock (to the next timer without an argument); the new time."""
        line = "clock_step" if nanoseconds is None else f"clock_step {nanoseconds}"
        return int(await self.command(line))

    async def close(self) -> None:
        """Close the socket (QEMU then exits)."""
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def write_line(address: int, data: bytes) -> str:
    """The ``write`` command storing ``data`` at ``address`` (for :meth:`Qtest.pipeline`)."""
    return f"write {address:#x} {len(data):#x} 0x{data.hex()}"


def ecam_address(bus: int, slot: int, function: int, offset: int = 0) -> int:
    """Where config register ``offset`` of ``bus:slot.function`` sits in virt's ECAM."""
    return (VIRT_ECAM + (bus << ECAM_BUS_SHIFT) + (slot << ECAM_SLOT_SHIFT)
            + (function << ECAM_FUNCTION_SHIFT) + offset)


@dataclasses.dataclass
class PciFunction:
    """A function found on bus 0, and the memory BARs assigned to it."""

    slot: int
    vendor_id: int
    device_id: int
    class_code: int
    #: BAR index -> (address, size) once assigned.
    bars: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def bar(self, index: int) -> int:
        """BAR ``index``'s address.

        :raises QtestError: the BAR was not assigned.
        """
        if index not in self.bars:
            raise QtestError(f"00:{self.slot:02x}.0 has no memory BAR{index}")
        return self.bars[index][0]


class PciBus:
    """Bus 0 of virt's PCIe host over ECAM: find functions, size and place their BARs."""

    def __init__(self, qtest: Qtest) -> None:
        self.qtest = qtest

    async def scan(self) -> list[PciFunction]:
        """Every function 0 on bus 0 (vendor id not all-ones)."""
        lines = [f"readl {ecam_address(0, slot, 0):#x}" for slot in range(PCI_SLOTS)]
        ids = [int(v, 16) for v in await self.qtest.pipeline(lines)]
        found = []
        for slot, ident in enumerate(ids):
            if ident == NO_FUNCTION:
                continue
            klass = await self.qtest.readl(ecam_address(0, slot, 0, PCI_CLASS_REVISION))
            found.append(PciFunction(slot, ident & 0xFFFF, ident >> 16, klass >> 8))
        return found

    async def assign(self, function: PciFunction, next_free: int) -> int:
        """Size and place ``function``'s memory BARs from ``next_free``; enable MEM and master.

        Each BAR is aligned to its size (BARs are naturally aligned).  Returns
        the first free address after them.

        :raises QtestError: the 32-bit window is exhausted.
        """
        index = 0
        while index < PCI_BARS:
            reg = ecam_address(0, function.slot, 0, PCI_BAR0 + 4 * index)
            original = await self.qtest.readl(reg)
            await self.qtest.writel(reg, DWORD_MASK)
            sized = await self.qtest.readl(reg)
            is_64 = (original & BAR_TYPE_MASK) == BAR_TYPE_64
            if sized == 0 or original & BAR_IO:
                await self.qtest.writel(reg, original)
                index += 1
                continue
            size = (~(sized & ~BAR_FLAGS_MASK) + 1) & DWORD_MASK
            address = (next_free + size - 1) & ~(size - 1)
            if address + size > VIRT_MMIO32[1]:
                raise QtestError(f"00:{function.slot:02x}.0 BAR{index} ({size:#x} bytes) does "
                                 f"not fit below {VIRT_MMIO32[1]:#x}")
            await self.qtest.writel(reg, address)
            if is_64:
                await self.qtest.writel(reg + 4, 0)
            function.bars[index] = (address, size)
            next_free = address + size
            index += 2 if is_64 else 1
        command = ecam_address(0, function.slot, 0, PCI_COMMAND)
        await self.qtest.writew(command, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        return next_free

    async def setup(self) -> list[PciFunction]:
        """Scan bus 0 and assign every function's BARs, largest first (so each stays aligned
        without holes, and the address a function gets does not depend on the others).
        """
        functions = await self.scan()
        sizes: dict[int, int] = {}
        for function in functions:
            probe = PciFunction(function.slot, 0, 0, 0)
            await self.assign(probe, VIRT_MMIO32[0])
            sizes[function.slot] = max((size for _, size in probe.bars.values()), default=0)
        next_free = VIRT_MMIO32[0]
        for function in sorted(functions, key=lambda f: -sizes[f.slot]):
            next_free = await self.assign(function, next_free)
        return functions


@dataclasses.dataclass(frozen=True)
class QtestConfig:
    """What QEMU to start under qtest."""

    devices: Sequence[str] = ()
    """``-device`` arguments (JSON for vfio-user-pci)."""
    machine_options: Sequence[str] = ()
    """Extra ``-machine`` options, e.g. ``iommu=smmuv3``."""
    memory_mib: int = DEFAULT_MEMORY_MIB


class QtestMachine:
    """A ``-M virt`` QEMU under ``-accel qtest``: the qtest stream plus QMP.  ``async with``."""

    def __init__(self, install: QemuInstall, config: QtestConfig, *, name: str = "qtest") -> None:
        self.install = install
        self.config = config
        self.name = name
        # Unix socket paths are limited to 108 bytes: keep them short, in /tmp.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vsmmu-{name}-"))
        self.qtest_socket = self.workdir / "qtest.sock"
        self.qmp_socket = self.workdir / "qmp.sock"
        self.stderr_path = self.workdir / "qemu.stderr"
        self.qmp = QMPClient(name)
        self._proc: asyncio.subprocess.Process | None = None
        self._qtest: Qtest | None = None

    @property
    def qtest(self) -> Qtest:
        """The qtest connection.

        :raises QtestError: before :meth:`start`.
        """
        if self._qtest is None:
            raise QtestError(f"{self.name}: qtest used before start()")
        return self._qtest

    def argv(self) -> list[str]:
        """The QEMU command line."""
        config = self.config
        machine = ",".join(["virt", "acpi=off", "gic-version=3", "memory-backend=mem",
                            *config.machine_options])
        argv = [*self.install.argv(),
                "-accel", "qtest", "-qtest", f"unix:{self.qtest_socket}",
                "-qtest-log", "/dev/null",
                "-machine", machine, "-cpu", "max", "-smp", "1",
                "-m", f"{config.memory_mib}M",
                "-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
                "-monitor", "none",
                "-chardev", f"socket,id=qmp,path={self.qmp_socket},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control"]
        for device in config.devices:
            argv += ["-device", device]
        return argv

    async def start(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Listen, start QEMU, accept its qtest connection, connect QMP.

        :raises QtestError: QEMU exited or did not connect within ``timeout``.
        """
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue())

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        server = await asyncio.start_unix_server(on_connect, path=str(self.qtest_socket),
                                                 limit=1 << 24)
        argv = self.argv()
        log.info("starting %s: %s", self.name, " ".join(argv))
        with open(self.stderr_path, "wb") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                env=self.install.env(), start_new_session=True)
        try:
            async with asyncio.timeout(timeout):
                exited = asyncio.ensure_future(self._proc.wait())
                got = asyncio.ensure_future(accepted.get())
                await asyncio.wait([exited, got], return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    raise QtestError(self.failure_report(
                        f"QEMU exited with status {self._proc.returncode} before connecting"))
                exited.cancel()
                self._qtest = Qtest(*got.result())
                await self._qtest.command("endianness")
                await self.qmp.connect(str(self.qmp_socket))
        except TimeoutError as exc:
            raise QtestError(self.failure_report(
                f"QEMU did not connect in {timeout}s")) from exc
        finally:
            server.close()

    async def system_reset(self) -> None:
        """QMP ``system_reset``, returning once QEMU reports the RESET event."""
        with self.qmp.listener("RESET") as listener:
            await self.qmp.execute("system_reset")
            async with asyncio.timeout(REPLY_TIMEOUT):
                await listener.get()

    def failure_report(self, reason: str) -> str:
        """``reason`` followed by QEMU's stderr."""
        try:
            stderr = self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            stderr = "(no stderr)"
        return f"{self.name}: {reason}\n--- QEMU stderr ---\n{stderr}"

    async def close(self) -> None:
        """Quit QEMU (QMP ``quit``, SIGKILL after a timeout) and remove the workdir."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self.qmp.execute("quit")
            try:
                async with asyncio.timeout(QUIT_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s: QEMU did not quit in %ss, killing", self.name, QUIT_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.qmp.disconnect()
        if self._qtest is not None:
            await self._qtest.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> QtestMachine:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
