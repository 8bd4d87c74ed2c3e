"""Interop of our vfio-user server with QEMU 11.1's client (vfio-user-pci).

The sample device (scratch register, write counter, INTx line) is served in
the test's event loop; QEMU gets it with the JSON ``-device`` form and its
guest RAM is a shared memfd (the harness sets that up), so DMA_MAP carries
fds the server can mmap.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from qmp_harness.fixtures import (  # noqa: F401 - pytest fixtures used by name
    BootMachine,
    GuestEnvironment,
    boot_machine,
    guest_env,
    vsmmu_cache,
)
from qmp_harness.machine import DEFAULT_APPEND, DEFAULT_MEMORY_MIB, Machine
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.dma import DmaError
from vsmmu.vfio_user.sample import (
    SAMPLE_BAR_SIZE,
    SAMPLE_IDENTITY,
    SAMPLE_MAGIC,
    SampleReg,
    ScratchDevice,
)
from vsmmu.vfio_user.server import VfioUserServer
from vsmmu.vfio_user.session import Session

#: PCI slot QEMU puts the device in (its INTx is then SPI 3 + (slot + pin - 1) % 4).
SLOT = 2
GUEST_RAM_BASE = 0x4000_0000
MIB = 1 << 20
#: The guest kernel is told to use less RAM than QEMU has, so the top MiBs are
#: not System RAM for it: /dev/mem may touch them and nothing else will.
GUEST_MEM_MIB = DEFAULT_MEMORY_MIB - 16
SPARE_GPA = GUEST_RAM_BASE + GUEST_MEM_MIB * MIB + 0x1000
PATTERN = 0x5A5A_C3C3
POSTED_WRITES = 40


def vfio_user_device(path: str) -> str:
    """The ``-device`` argument (JSON form: QEMU rejects the dotted one for ``socket``)."""
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}}
    return json.dumps({**device, "addr": f"{SLOT:#x}"})


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="vfu-", dir="/tmp")
    path = os.path.join(directory, "sample.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(directory)


@pytest.fixture
async def sample_server(socket_path: str) -> AsyncIterator[tuple[ScratchDevice, VfioUserServer]]:
    sample = ScratchDevice()
    async with VfioUserServer(sample.pci, socket_path) as server:
        yield sample, server


def our_function(pci: list[dict[str, Any]]) -> dict[str, Any]:
    for device in pci:
        if device["id"]["vendor"] == SAMPLE_IDENTITY.vendor_id and (
            device["id"]["device"] == SAMPLE_IDENTITY.device_id
        ):
            return device
    raise AssertionError(f"sample device not in query-pci: {pci}")


def session_of(server: VfioUserServer) -> Session:
    assert server.connection is not None, "QEMU is not connected to the server"
    return server.connection.session


@pytest.mark.integration
async def test_qemu_realizes_device_and_maps_ram(
    boot_machine: BootMachine,  # noqa: F811
    sample_server: tuple[ScratchDevice, VfioUserServer],
    socket_path: str,
) -> None:
    sample, server = sample_server
    vm = await boot_machine(devices=[vfio_user_device(socket_path)], paused=True)
    function = our_function(await vm.query_pci())
    assert function["slot"] == SLOT
    assert function["class_info"]["class"] == SAMPLE_IDENTITY.class_code >> 8
    bar0 = next(region for region in function["regions"] if region["bar"] == 0)
    assert bar0["size"] == SAMPLE_BAR_SIZE and bar0["type"] == "memory"
    assert function["irq_pin"] == uapi.PCI_INTERRUPT_PIN_INTA

    stats = session_of(server).stats
    for command in (
        "VERSION",
        "DMA_MAP",
        "DEVICE_GET_INFO",
        "DEVICE_GET_REGION_INFO",
        "DEVICE_GET_IRQ_INFO",
        "REGION_READ",
    ):
        assert stats[command] >= 1, f"QEMU never sent {command}: {stats}"
    assert stats["refused"] == 0, stats
    # The whole guest RAM arrived as an fd the server could mmap.
    ram = sample.pci.dma.find(GUEST_RAM_BASE, DEFAULT_MEMORY_MIB * MIB)
    assert ram.memory is not None


@pytest.mark.e2e
async def test_guest_devmem_drives_device(
    boot_machine: BootMachine,  # noqa: F811
    sample_server: tuple[ScratchDevice, VfioUserServer],
    socket_path: str,
) -> None:
    sample, server = sample_server
    vm: Machine = await boot_machine(
        devices=[vfio_user_device(socket_path)],
        append=f"{DEFAULT_APPEND} mem={GUEST_MEM_MIB}M",
    )
    function = our_function(await vm.query_pci())
    bdf = f"0000:00:{SLOT:02x}.{function['function']}"
    console = vm.console

    async def sh(command: str) -> str:
        output, status = await console.run(command)
        assert status == 0, f"{command!r} failed ({status}): {output}"
        return output.strip()

    # Memory decoding is off until enabled; only then does QEMU map the BAR.
    await sh(f"echo 1 > /sys/bus/pci/devices/{bdf}/enable")
    function = our_function(await vm.query_pci())
    bar = next(region for region in function["regions"] if region["bar"] == 0)["address"]
    guest_view = await sh(f"head -n 1 /sys/bus/pci/devices/{bdf}/resource")
    assert int(guest_view.split()[0], 16) == bar
    assert int(await sh(f"devmem {bar + SampleReg.MAGIC:#x} 32"), 16) == SAMPLE_MAGIC
    await sh(f"devmem {bar + SampleReg.SCRATCH:#x} 32 0x12345678")
    assert sample.scratch == 0x12345678
    assert int(await sh(f"devmem {bar + SampleReg.SCRATCH:#x} 32"), 16) == 0x12345678

    # Posted writes: in order, never answered (an answer would make QEMU
    # report an unexpected reply), counted by the device.
    posted_before = session_of(server).stats["posted"]
    first = len(sample.writes)
    await sh(
        f"i=1; while [ $i -le {POSTED_WRITES} ]; do "
        f"devmem {bar + SampleReg.SCRATCH:#x} 32 $i; i=$((i+1)); done"
    )
    count = int(await sh(f"devmem {bar + SampleReg.WRITE_COUNT:#x} 32"), 16)
    assert count == len(sample.writes) == first + POSTED_WRITES
    assert [value for _, value in sample.writes[first:]] == list(range(1, POSTED_WRITES + 1))
    assert session_of(server).stats["posted"] - posted_before >= POSTED_WRITES

    # INTx: QEMU assigned an eventfd; asserting the line signals it, and QEMU
    # unmasks (SET_IRQS DATA_NONE|UNMASK) after the guest touches the BAR.
    intx = sample.pci.intx
    assert intx.eventfd is not None, "QEMU did not assign an INTx eventfd"
    await sh(f"devmem {bar + SampleReg.IRQ:#x} 32 1")
    assert intx.delivered >= 1
    await sh(f"devmem {bar + SampleReg.IRQ:#x} 32 0")
    await sh(f"devmem {bar + SampleReg.MAGIC:#x} 32")
    await asyncio.sleep(0.2)
    assert not intx.masked, "QEMU never unmasked INTx"

    # DMA through the fd QEMU passed: guest writes, server reads; and back.
    await sh(f"devmem {SPARE_GPA:#x} 32 {PATTERN:#x}")
    assert sample.pci.dma.read(SPARE_GPA, 4) == PATTERN.to_bytes(4, "little")
    sample.pci.dma.write(SPARE_GPA + 4, (~PATTERN & 0xFFFF_FFFF).to_bytes(4, "little"))
    assert int(await sh(f"devmem {SPARE_GPA + 4:#x} 32"), 16) == ~PATTERN & 0xFFFF_FFFF

    assert "unexpected reply" not in vm.stderr_text()
    assert session_of(server).stats["refused"] == 0, session_of(server).stats


class PrivateRamMachine(Machine):
    """A machine whose RAM is anonymous (no fd): DMA_MAP then carries no fd."""

    def argv(self) -> list[str]:
        argv = super().argv()
        backend = next(n for n, arg in enumerate(argv) if arg.startswith("memory-backend-memfd"))
        argv[backend] = f"memory-backend-ram,id=mem,size={self.config.memory_mib}M"
        return argv


@pytest.mark.e2e
async def test_message_dma_against_qemu_layout(
    guest_env: GuestEnvironment,  # noqa: F811
    sample_server: tuple[ScratchDevice, VfioUserServer],
    socket_path: str,
) -> None:
    """Without fd-backed RAM the server reaches guest memory by DMA_READ/DMA_WRITE
    messages in QEMU's layout; QEMU refuses them while bus mastering is off."""
    sample, server = sample_server
    config = guest_env.machine_config(
        devices=[vfio_user_device(socket_path)], append=f"{DEFAULT_APPEND} mem={GUEST_MEM_MIB}M"
    )
    async with PrivateRamMachine(guest_env.qemu, config, name="vfu-noram") as vm:
        await vm.start()
        await vm.wait_ready()
        ram = sample.pci.dma.find(GUEST_RAM_BASE, DEFAULT_MEMORY_MIB * MIB)
        assert ram.memory is None, "RAM unexpectedly arrived with an fd"
        with pytest.raises(DmaError, match=f"errno {errno.ENODEV}"):
            await server.dma_read(SPARE_GPA, 4)  # bus master is off
        bdf = f"0000:00:{SLOT:02x}.0"
        command = uapi.PCI_COMMAND_MEMORY | uapi.PCI_COMMAND_MASTER
        output, status = await vm.console.run(
            f"printf '\\{command:03o}' | dd of=/sys/bus/pci/devices/{bdf}/config "
            f"bs=1 seek={uapi.PCI_COMMAND} conv=notrunc"
        )
        assert status == 0, output
        output, status = await vm.console.run(
            f"devmem {SPARE_GPA:#x} 32 {PATTERN:#x}; devmem {SPARE_GPA:#x} 32"
        )
        assert status == 0 and int(output.strip(), 16) == PATTERN, output
        assert await server.dma_read(SPARE_GPA, 4) == PATTERN.to_bytes(4, "little")
        await server.dma_write(SPARE_GPA + 8, b"\x11\x22\x33\x44")
        output, status = await vm.console.run(f"devmem {SPARE_GPA + 8:#x} 32")
        assert int(output.strip(), 16) == 0x4433_2211
