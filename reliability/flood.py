"""A guest that floods a virtio-rng endpoint, and what that does to everyone else.

:func:`rng_flood` plays a guest with two vfio-user connections to a running
service: the SMMU function (its RAM mapped, the SMMU left disabled with GBPA
bypass, so the endpoint's DMA lands at IOVA = GPA) and the virtio-rng
endpoint, brought up the way Linux's virtio_pci_modern does over its BAR.
It keeps the request queue full (:data:`QUEUE_SIZE` chains of
:data:`BUFFER_BYTES`) and rings the doorbell with posted writes back to back,
while a prober times SMMU register reads (as a vCPU's MMIO load would wait)
and QMP ``query-vsmmu`` calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from reliability.probes import ProbeStats, sealable_memfd
from vsmmu.arch.registers import Reg
from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.virtio_pci import COMMON_CFG_OFFSET, NOTIFY_OFFSET
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import VfioUserClient

QUEUE_SIZE = 64
BUFFER_BYTES = 64 * 1024
RAM_GPA = 0x4000_0000
RAM_SIZE = 8 << 20
DESC = 0x0000
AVAIL = 0x1000
USED = 0x2000
BUFFERS = 0x10000
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_DESC_F_WRITE = 2
_DOORBELLS_PER_BURST = 64
_READ_INTERVAL_S = 0.02
_QMP_INTERVAL_S = 0.5

#: ``await execute(command)``: a QMP command on the service.
QmpExecute = Callable[[str], Awaitable[Any]]


@dataclasses.dataclass
class FloodResult:
    """Latencies seen during the flood, and how much the device did."""

    register_reads: ProbeStats
    qmp: ProbeStats
    doorbells: int
    requests_completed: int
    seconds: float

    def lines(self) -> list[str]:
        """Human-readable figures."""
        reads, qmp = self.register_reads, self.qmp
        return [
            f"flood of {self.seconds:.0f} s: {self.doorbells} doorbells, "
            f"{self.requests_completed} requests of {BUFFER_BYTES // 1024} KiB completed",
            f"  SMMU register reads: {len(reads.latencies_s)}, p50 "
            f"{reads.percentile(0.5) * 1000:.1f} ms, p99 {reads.percentile(0.99) * 1000:.1f} ms,"
            f" max {max(reads.latencies_s, default=0) * 1000:.1f} ms",
            f"  QMP query-vsmmu: {len(qmp.latencies_s)}, p99 {qmp.percentile(0.99) * 1000:.1f} ms,"
            f" max {max(qmp.latencies_s, default=0) * 1000:.1f} ms",
        ]


class _Driver:
    """The guest's virtio-rng driver, over vfio-user REGION_WRITEs to the endpoint's BAR 0."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client

    async def write(self, register: vu.CommonCfg, value: int) -> None:
        width = vu.COMMON_CFG_WIDTH[register]
        await self.client.region_write(uapi.PciRegion.BAR0, COMMON_CFG_OFFSET + register,
                                       value.to_bytes(width, "little"))

    async def bring_up(self) -> None:
        command = (uapi.PCI_COMMAND_MASTER | uapi.PCI_COMMAND_MEMORY).to_bytes(2, "little")
        await self.client.region_write(uapi.PciRegion.CONFIG, uapi.PCI_COMMAND, command)
        status = vu.DeviceStatus.ACKNOWLEDGE | vu.DeviceStatus.DRIVER
        await self.write(vu.CommonCfg.DEVICE_STATUS, status)
        features = 1 << vu.VirtioFeature.VERSION_1 | 1 << vu.VirtioFeature.ACCESS_PLATFORM
        for select in (0, 1):
            await self.write(vu.CommonCfg.DRIVER_FEATURE_SELECT, select)
            await self.write(vu.CommonCfg.DRIVER_FEATURE, (features >> (32 * select)) & 0xFFFFFFFF)
        status |= vu.DeviceStatus.FEATURES_OK
        await self.write(vu.CommonCfg.DEVICE_STATUS, status)
        await self.write(vu.CommonCfg.QUEUE_SELECT, 0)
        await self.write(vu.CommonCfg.QUEUE_SIZE, QUEUE_SIZE)
        for low, address in ((vu.CommonCfg.QUEUE_DESC_LO, RAM_GPA + DESC),
                             (vu.CommonCfg.QUEUE_DRIVER_LO, RAM_GPA + AVAIL),
                             (vu.CommonCfg.QUEUE_DEVICE_LO, RAM_GPA + USED)):
            await self.write(low, address & 0xFFFFFFFF)
            await self.write(vu.CommonCfg(low + 4), address >> 32)
        await self.write(vu.CommonCfg.QUEUE_ENABLE, 1)
        await self.write(vu.CommonCfg.DEVICE_STATUS, status | vu.DeviceStatus.DRIVER_OK)

    async def ring(self) -> None:
        await self.client.region_write(uapi.PciRegion.BAR0, NOTIFY_OFFSET,
                                       _U16.pack(0), posted=True)


async def rng_flood(smmu_socket: str, endpoint_socket: str, qmp_execute: QmpExecute,
                    seconds: float) -> FloodResult:
    """Flood for ``seconds``; ``qmp_execute(command)`` is awaited to time QMP."""
    fd = sealable_memfd(RAM_SIZE, "flood-guest-ram")
    ram = mmap.mmap(fd, RAM_SIZE)
    smmu, endpoint = VfioUserClient(), VfioUserClient()
    try:
        for index in range(QUEUE_SIZE):
            _DESC.pack_into(ram, DESC + index * _DESC.size,
                            RAM_GPA + BUFFERS + index * BUFFER_BYTES, BUFFER_BYTES,
                            _DESC_F_WRITE, 0)
            _U16.pack_into(ram, AVAIL + 4 + 2 * index, index)
        _U16.pack_into(ram, AVAIL + 2, QUEUE_SIZE)
        await smmu.connect(smmu_socket)
        await smmu.negotiate()
        await smmu.dma_map(RAM_GPA, RAM_SIZE, fd)
        await endpoint.connect(endpoint_socket)
        await endpoint.negotiate()
        await _Driver(endpoint).bring_up()
        return await _measure(smmu, _Driver(endpoint), ram, qmp_execute, seconds)
    finally:
        await endpoint.close()
        await smmu.close()
        ram.close()
        os.close(fd)


async def _measure(smmu: VfioUserClient, driver: _Driver, ram: mmap.mmap,
                   qmp_execute: QmpExecute, seconds: float) -> FloodResult:
    reads, qmp = ProbeStats(), ProbeStats()
    doorbells = 0
    start = time.monotonic()
    until = start + seconds

    async def flood() -> None:
        nonlocal doorbells
        while time.monotonic() < until:
            for _ in range(_DOORBELLS_PER_BURST):
                used = _U16.unpack_from(ram, USED + 2)[0]
                _U16.pack_into(ram, AVAIL + 2, (used + QUEUE_SIZE) & 0xFFFF)  # keep it full
                await driver.ring()
            doorbells += _DOORBELLS_PER_BURST
            await asyncio.sleep(0)

    async def probe_registers() -> None:
        payload = uapi.REGION_RW.pack(int(Reg.IDR0), uapi.PciRegion.BAR0, 4)
        while time.monotonic() < until:
            t = time.monotonic()
            await smmu.request(uapi.Command.REGION_READ, payload, timeout=seconds + 60)
            reads.latencies_s.append(time.monotonic() - t)
            await asyncio.sleep(_READ_INTERVAL_S)

    async def probe_qmp() -> None:
        while time.monotonic() < until:
            t = time.monotonic()
            await qmp_execute("query-vsmmu")
            qmp.latencies_s.append(time.monotonic() - t)
            await asyncio.sleep(_QMP_INTERVAL_S)

    await asyncio.gather(flood(), probe_registers(), probe_qmp())
    completed = _U16.unpack_from(ram, USED + 2)[0]
    return FloodResult(reads, qmp, doorbells, completed, time.monotonic() - start)
