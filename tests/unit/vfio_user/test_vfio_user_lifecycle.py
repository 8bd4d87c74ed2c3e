"""Connect/disconnect cycles: state torn down, nothing leaked, next client served."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import VfioUserClient
from vsmmu.vfio_user.sample import SampleReg, ScratchDevice
from vsmmu.vfio_user.server import VfioUserServer

CYCLES = 100
PAGE = uapi.DEFAULT_PGSIZE
TRIGGER_EVENTFD = uapi.IRQ_SET_DATA_EVENTFD | uapi.IRQ_SET_ACTION_TRIGGER


async def one_session(path: str, memfd: int, eventfd: int) -> None:
    async with VfioUserClient() as client:
        await client.connect(path)
        await client.negotiate()
        await client.dma_map(0x8000_0000, 2 * PAGE, memfd)
        await client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1, [eventfd])
        await client.region_write(uapi.PciRegion.BAR0, SampleReg.SCRATCH, b"\1\0\0\0")
        # Leave with a message cut short and an fd in flight.
        header = uapi.HEADER.pack(9, uapi.Command.DMA_MAP, 16 + uapi.DMA_MAP.size, 0, 0)
        await client.send_raw(header + b"\x20", [memfd])


async def test_hundred_cycles_leak_nothing(
    open_fds: Callable[[], int], server: VfioUserServer, socket_path: str, sample: ScratchDevice
) -> None:
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 2 * PAGE)
    eventfd = os.eventfd(0)
    try:
        await one_session(socket_path, memfd, eventfd)  # warm up lazily opened fds
        await asyncio.wait_for(server.wait_disconnected(), 5)
        while server.connections_served < 1:
            await asyncio.sleep(0.01)
        before = open_fds()
        for cycle in range(CYCLES):
            await one_session(socket_path, memfd, eventfd)
            while server.connections_served < cycle + 2:
                await asyncio.sleep(0.001)
            assert len(sample.pci.dma) == 0
            assert sample.pci.intx.eventfd is None
        assert open_fds() == before
        assert sample.disconnects == CYCLES + 1
    finally:
        os.close(memfd)
        os.close(eventfd)


async def test_several_servers_share_one_loop(socket_path: str) -> None:
    devices = [ScratchDevice() for _ in range(3)]
    paths = [f"{socket_path}.{n}" for n in range(3)]
    servers = [
        VfioUserServer(device.pci, path) for device, path in zip(devices, paths, strict=True)
    ]
    for server in servers:
        await server.start()
    try:
        clients = [VfioUserClient() for _ in servers]
        for client, path in zip(clients, paths, strict=True):
            await client.connect(path)
            await client.negotiate()
        for n, client in enumerate(clients):
            await client.region_write(uapi.PciRegion.BAR0, SampleReg.SCRATCH, bytes([n, 0, 0, 0]))
        assert [device.scratch for device in devices] == [0, 1, 2]
        for client in clients:
            await client.close()
    finally:
        for server in servers:
            await server.close()
    assert not any(os.path.exists(path) for path in paths)
