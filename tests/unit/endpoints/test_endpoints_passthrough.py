"""The VFIO passthrough endpoint, served over vfio-user, on a MOCK of the kernel.

No VFIO device exists on this machine, so :class:`MockVfioKernel` plays the
kernel under :class:`KernelIommufd`: iommufd requests go to the sim's raw
ioctl path, VFIO device requests to a mock vfio-pci device whose regions are
ranges of a real file (so ``pread``/``pwrite``/``mmap`` of "the cdev" are
real).  What the endpoint must do is checked against what the mock records:
the eventfds the client sent are the ones handed to SET_IRQS (the mock
signals them as the kernel would and the client sees it), region info comes
with the fd and VFIO's offset and capabilities, reset and disconnect reach
VFIO, and a departed client leaves the device unbound.  The real kernel runs
the same endpoint in the host lane (tests/passthrough).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsmmu.endpoints import make_endpoint
from vsmmu.endpoints.base import EndpointError
from vsmmu.endpoints.passthrough import VfioPassthrough
from vsmmu.iommufd import uapi
from vsmmu.iommufd import uapi_vfio as vfio
from vsmmu.iommufd.kernel import KernelIommufd
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.vfio_user import VfioUserServer
from vsmmu.vfio_user import uapi as vu
from vsmmu.vfio_user.client import ClientError, VfioUserClient

BAR0_OFFSET, BAR0_SIZE = 0x0000, 0x1000
BAR2_OFFSET, BAR2_SIZE = 0x2000, 0x1000
CONFIG_OFFSET, CONFIG_SIZE = 0x4000, 0x100
FILE_SIZE = 0x5000
VENDOR_DEVICE = bytes.fromhex("361b0500")  # 1b36:0005, as the config header stores it
REGION_INFO_SIZE = ctypes.sizeof(vfio.VfioRegionInfo)


def sparse_cap() -> bytes:
    """A sparse-mmap capability with one area: all of BAR0."""
    cap = vfio.VfioRegionInfoCapSparseMmap()
    cap.header.id = vfio.RegionInfoCap.SPARSE_MMAP
    cap.header.version = 1
    cap.nr_areas = 1
    area = vfio.VfioRegionSparseMmapArea()
    area.offset, area.size = 0, BAR0_SIZE
    return cap.to_bytes() + area.to_bytes()


class MockVfioKernel:
    """MOCK kernel: the sim behind /dev/iommu requests, a mock vfio-pci device behind the rest.

    ``calls`` records every VFIO device request as ``(name, index, flags, start, count)``;
    ``triggers`` holds the kernel's own reference (a dup) to each eventfd SET_IRQS gave it.
    """

    def __init__(self, pci: bool = True) -> None:
        self.sim = SimIommufd()
        self.pci = pci
        self.devices: dict[int, int] = {}
        self.calls: list[tuple[str, int, int, int, int]] = []
        self.triggers: dict[tuple[int, int], int] = {}
        self.regions = {
            0: (vfio.RegionInfoFlags.READ | vfio.RegionInfoFlags.WRITE
                | vfio.RegionInfoFlags.MMAP, BAR0_SIZE, BAR0_OFFSET, sparse_cap()),
            2: (vfio.RegionInfoFlags.READ | vfio.RegionInfoFlags.WRITE, BAR2_SIZE, BAR2_OFFSET,
                b""),
            7: (vfio.RegionInfoFlags.READ | vfio.RegionInfoFlags.WRITE, CONFIG_SIZE,
                CONFIG_OFFSET, b""),
        }
        self.irqs = {0: (vfio.IrqInfoFlags.EVENTFD | vfio.IrqInfoFlags.MASKABLE
                         | vfio.IrqInfoFlags.AUTOMASKED, 1),
                     1: (vfio.IrqInfoFlags.EVENTFD | vfio.IrqInfoFlags.NORESIZE, 2)}

    def __call__(self, fd: int, request: int, arg: object, mutate: bool) -> int:
        assert mutate
        if isinstance(arg, uapi.VfioDeviceBindIommufd):
            arg.out_devid = self.devices[fd] = self.sim.create_mock_device(0x10)
        elif isinstance(arg, uapi.VfioDeviceAttachIommufdPt):
            self.sim.device_attach(self.devices[fd], arg.pt_id)
        elif isinstance(arg, uapi.VfioDeviceDetachIommufdPt):
            self.sim.device_detach(self.devices[fd])
        elif isinstance(arg, uapi.UapiStruct):
            buf = bytearray(arg.to_bytes())
            try:
                self.sim.ioctl(request, buf)
            finally:
                ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))
        else:
            assert isinstance(arg, bytearray)
            self._device_ioctl(vfio.VfioIoctl(request), arg)
        return 0

    def _device_ioctl(self, request: vfio.VfioIoctl, buf: bytearray) -> None:
        if request is vfio.VfioIoctl.VFIO_DEVICE_GET_INFO:
            info = vfio.VfioDeviceInfo.from_buffer(buf)
            info.flags = vfio.DeviceFlags.RESET | (vfio.DeviceFlags.PCI if self.pci else 0)
            info.num_regions, info.num_irqs = 9, 5
        elif request is vfio.VfioIoctl.VFIO_DEVICE_GET_REGION_INFO:
            self._region_info(buf)
        elif request is vfio.VfioIoctl.VFIO_DEVICE_GET_IRQ_INFO:
            irq = vfio.VfioIrqInfo.from_buffer(buf)
            if irq.index == vfio.PciIrqIndex.ERR:  # vfio-pci: no ERR index off PCIe
                raise OSError(errno.EINVAL, "no such IRQ index")
            irq.flags, irq.count = self.irqs.get(irq.index, (0, 0))
        elif request is vfio.VfioIoctl.VFIO_DEVICE_SET_IRQS:
            self._set_irqs(buf)
        elif request is vfio.VfioIoctl.VFIO_DEVICE_RESET:
            self.calls.append(("RESET", 0, 0, 0, 0))

    def _region_info(self, buf: bytearray) -> None:
        info = vfio.VfioRegionInfo.from_buffer_copy(buf[:REGION_INFO_SIZE])
        if info.index == vfio.PciRegionIndex.VGA:  # vfio-pci: no VGA region, EINVAL
            raise OSError(errno.EINVAL, "no such region")
        flags, size, offset, caps = self.regions.get(info.index, (0, 0, 0, b""))
        needed = REGION_INFO_SIZE + len(caps)
        out = vfio.VfioRegionInfo()
        out.index, out.size, out.offset = info.index, size, offset
        out.flags = flags | (vfio.RegionInfoFlags.CAPS if caps else 0)
        if info.argsz < needed:
            out.argsz = needed  # too small: the kernel says how much, without the caps
        else:
            out.argsz, out.cap_offset = needed, (REGION_INFO_SIZE if caps else 0)
            buf[REGION_INFO_SIZE:needed] = caps
        buf[:REGION_INFO_SIZE] = out.to_bytes()

    def _set_irqs(self, buf: bytearray) -> None:
        head = vfio.VfioIrqSet.from_buffer_copy(buf[: ctypes.sizeof(vfio.VfioIrqSet)])
        self.calls.append(("SET_IRQS", head.index, head.flags, head.start, head.count))
        if head.flags & vfio.IrqSetFlags.DATA_EVENTFD:
            data = buf[ctypes.sizeof(vfio.VfioIrqSet):]
            for n, fd in enumerate(struct.unpack(f"<{head.count}i", data[: 4 * head.count])):
                old = self.triggers.pop((head.index, head.start + n), None)
                if old is not None:
                    os.close(old)
                if fd != vfio.EVENTFD_NONE:
                    self.triggers[(head.index, head.start + n)] = os.dup(fd)
        elif head.flags & vfio.IrqSetFlags.DATA_NONE and head.count == 0:
            for key in [k for k in self.triggers if k[0] == head.index]:
                os.close(self.triggers.pop(key))

    def close(self) -> None:
        for fd in self.triggers.values():
            os.close(fd)
        self.sim.close()


@pytest.fixture
def device_file(tmp_path: Path) -> Path:
    """The mock device's regions: BAR0 and BAR2 patterned, a config header at CONFIG_OFFSET."""
    path = tmp_path / "vfio0"
    data = bytearray(FILE_SIZE)
    data[BAR0_OFFSET:BAR0_OFFSET + BAR0_SIZE] = bytes(range(256)) * (BAR0_SIZE // 256)
    data[BAR2_OFFSET:BAR2_OFFSET + BAR2_SIZE] = b"\xa5" * BAR2_SIZE
    data[CONFIG_OFFSET:CONFIG_OFFSET + 4] = VENDOR_DEVICE
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def kernel() -> Iterator[tuple[KernelIommufd, MockVfioKernel]]:
    mock = MockVfioKernel()
    backend = KernelIommufd(fd=os.open(os.devnull, os.O_RDWR), ioctl_fn=mock)
    yield backend, mock
    backend.close()
    mock.close()


class Binding:
    """The service's side of a bind: what it was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def bound(self, dev_id: int) -> None:
        self.events.append(("bound", dev_id))

    def unbinding(self, dev_id: int) -> None:
        self.events.append(("unbinding", dev_id))


async def _connect(path: Path) -> VfioUserClient:
    client = VfioUserClient()
    await client.connect(str(path))
    await client.negotiate()
    return client


async def test_regions_irqs_reset_and_rebind_forwarded_to_vfio(
        tmp_path: Path, device_file: Path,
        kernel: tuple[KernelIommufd, MockVfioKernel]) -> None:
    backend, mock = kernel
    endpoint = make_endpoint(f"vfio={device_file}")
    assert isinstance(endpoint, VfioPassthrough) and endpoint.name == "vfio0"
    binding = Binding()
    dev_id = endpoint.bind(backend, on_bound=binding.bound, on_unbinding=binding.unbinding)
    assert [o.id for o in backend.objects() if o.type.value == "device"] == [dev_id]
    server = VfioUserServer(endpoint.pci, tmp_path / "vfio0.sock")
    await server.start()
    try:
        client = await _connect(tmp_path / "vfio0.sock")
        flags, regions, irqs = await client.device_info()
        assert flags & vu.DEVICE_FLAGS_PCI and regions >= 9 and irqs >= 3

        # BAR0: mmap-able. Too small an argsz: told the size, no caps; then the caps as VFIO's.
        short = await client.region_info(0)
        assert short.argsz == REGION_INFO_SIZE + len(sparse_cap()) and short.caps == b""
        assert not short.flags & vu.REGION_INFO_FLAG_CAPS
        assert short.fd is not None
        os.close(short.fd)
        full = await client.region_info(0, argsz=short.argsz)
        assert full.flags & vu.REGION_INFO_FLAG_MMAP and full.flags & vu.REGION_INFO_FLAG_CAPS
        assert (full.size, full.offset, full.cap_offset) == (BAR0_SIZE, BAR0_OFFSET,
                                                              REGION_INFO_SIZE)
        assert full.caps == sparse_cap()
        assert full.fd is not None
        with mmap.mmap(full.fd, BAR0_SIZE, offset=full.offset) as bar0:
            assert bar0[:256] == bytes(range(256))
            bar0[0:4] = b"MMAP"
        os.close(full.fd)
        assert device_file.read_bytes()[BAR0_OFFSET:BAR0_OFFSET + 4] == b"MMAP"

        # BAR2: trapped, pread/pwrite at VFIO's offset; config space likewise.
        bar2 = await client.region_info(2)
        assert bar2.fd is None and not bar2.flags & vu.REGION_INFO_FLAG_MMAP
        assert await client.region_read(2, 0x10, 4) == b"\xa5" * 4
        await client.region_write(2, 0x10, b"\x01\x02\x03\x04")
        assert device_file.read_bytes()[BAR2_OFFSET + 0x10:BAR2_OFFSET + 0x14] == bytes(
            [1, 2, 3, 4])
        config = await client.region_info(vu.PciRegion.CONFIG)
        assert config.size == CONFIG_SIZE and config.fd is None
        assert await client.region_read(vu.PciRegion.CONFIG, 0, 4) == VENDOR_DEVICE
        await client.region_write(vu.PciRegion.CONFIG, vu.PCI_COMMAND, b"\x06\x00")
        assert device_file.read_bytes()[CONFIG_OFFSET + 4:CONFIG_OFFSET + 6] == b"\x06\x00"
        assert (await client.irq_info(1)).count == 2
        assert (await client.irq_info(vu.PciIrq.ERR)).count == 0  # VFIO: EINVAL, absent
        assert (await client.region_info(vu.PciRegion.VGA)).size == 0

        # INTx: the client's eventfd reaches VFIO; the kernel signalling it wakes the client.
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            await client.set_irqs(vu.PciIrq.INTX,
                                  vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER,
                                  0, 1, fds=[efd])
            assert ("SET_IRQS", 0, vfio.IrqSetFlags.DATA_EVENTFD
                    | vfio.IrqSetFlags.ACTION_TRIGGER, 0, 1) in mock.calls
            os.eventfd_write(mock.triggers[(0, 0)], 1)
            assert os.eventfd_read(efd) == 1
        finally:
            os.close(efd)
        await client.set_irqs(vu.PciIrq.INTX, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_UNMASK,
                              0, 1)
        assert mock.calls[-1] == ("SET_IRQS", 0, vfio.IrqSetFlags.DATA_NONE
                                  | vfio.IrqSetFlags.ACTION_UNMASK, 0, 1)
        with pytest.raises(ClientError) as refused:
            await client.set_irqs(vu.PciIrq.MSI, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_MASK,
                                  1, 2)
        assert refused.value.errno == errno.EINVAL  # start 1 + count 2 > VFIO's 2 vectors

        await client.reset()
        assert mock.calls[-1][0] == "RESET"

        # Disconnect: interrupts off, reset, then unbound (the service was told first).
        mock.calls.clear()
        await client.close()
        await asyncio.wait_for(server.wait_disconnected(), 10)
        assert ("SET_IRQS", 0, vfio.IrqSetFlags.DATA_NONE | vfio.IrqSetFlags.ACTION_TRIGGER,
                0, 0) in mock.calls
        assert ("SET_IRQS", 1, vfio.IrqSetFlags.DATA_NONE | vfio.IrqSetFlags.ACTION_TRIGGER,
                0, 0) in mock.calls
        assert mock.calls[-1][0] == "RESET" and mock.triggers == {}
        assert binding.events == [("unbinding", dev_id)]
        assert endpoint.dev_id is None
        assert not [o for o in backend.objects() if o.type.value == "device"]

        # The next client binds it again and is served as before.
        client = await _connect(tmp_path / "vfio0.sock")
        assert await client.region_read(vu.PciRegion.CONFIG, 0, 4) == VENDOR_DEVICE
        assert binding.events[-1] == ("bound", endpoint.dev_id)
        await client.close()
    finally:
        await server.close()


def test_bind_refuses_with_a_clear_error(device_file: Path,
                                         kernel: tuple[KernelIommufd, MockVfioKernel]) -> None:
    backend, mock = kernel
    binding = Binding()
    missing = VfioPassthrough("/dev/vfio/devices/vfio99")
    with pytest.raises(EndpointError, match=r"vfio99.*cannot bind.*ENOENT"):
        missing.bind(backend, on_bound=binding.bound, on_unbinding=binding.unbinding)
    with pytest.raises(EndpointError, match="needs --backend kernel"):
        VfioPassthrough(str(device_file)).bind(SimIommufd(), on_bound=binding.bound,
                                               on_unbinding=binding.unbinding)
    mock.pci = False
    with pytest.raises(EndpointError, match="not a PCI device"):
        VfioPassthrough(str(device_file)).bind(backend, on_bound=binding.bound,
                                               on_unbinding=binding.unbinding)
    assert not [o for o in backend.objects() if o.type.value == "device"]


@pytest.mark.parametrize("spec", ["vfio=", "vfio=/dev/vfio/devices/vfio0,seed=1"])
def test_spec_errors(spec: str) -> None:
    with pytest.raises(EndpointError, match="expected vfio=PATH"):
        make_endpoint(spec)
