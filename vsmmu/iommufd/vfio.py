"""A VFIO device bound to iommufd, as a VMM uses it: regions, interrupts, reset.

:class:`VfioDevice` wraps the fd of a VFIO cdev (``/dev/vfio/devices/vfioN``)
that :meth:`vsmmu.iommufd.kernel.KernelIommufd.bind_vfio_cdev` opened and
bound; the backend owns the fd, this object only issues the device ioctls on
it (:mod:`vsmmu.iommufd.uapi_vfio`) and reads and writes its regions with
``pread``/``pwrite`` at the offsets VFIO reports.  Every failure is a
:class:`VfioDeviceError` carrying the kernel's errno and the ioctl's name.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence

from vsmmu.iommufd import uapi_vfio as vfio
from vsmmu.iommufd.uapi import UapiStruct

log = logging.getLogger(__name__)

RawIoctlFn = Callable[[int, int, bytearray, bool], object]
"""``fcntl.ioctl(fd, request, mutable_buffer, True)``'s shape."""

_REGION_INFO_SIZE = ctypes.sizeof(vfio.VfioRegionInfo)
_IRQ_SET_SIZE = ctypes.sizeof(vfio.VfioIrqSet)


class VfioDeviceError(OSError):
    """A VFIO device ioctl or region access failed (``errno`` is the kernel's)."""

    def __init__(self, err: int, op: str, message: str) -> None:
        super().__init__(err, f"{op}: {errno.errorcode.get(err, str(err))}: {message}")
        self.op = op


@dataclasses.dataclass(frozen=True)
class VfioDeviceInfo:
    """``VFIO_DEVICE_GET_INFO``."""

    flags: vfio.DeviceFlags
    num_regions: int
    num_irqs: int


@dataclasses.dataclass(frozen=True)
class VfioRegion:
    """``VFIO_DEVICE_GET_REGION_INFO`` for one region.

    ``offset`` is where the region starts in the device fd (for ``pread``,
    ``pwrite`` and ``mmap``); ``caps`` is the capability chain exactly as
    the kernel wrote it after the fixed structure (``next`` offsets count
    from the structure's start), empty when there is none.
    """

    index: int
    flags: vfio.RegionInfoFlags
    size: int
    offset: int
    caps: bytes = b""


@dataclasses.dataclass(frozen=True)
class VfioIrq:
    """``VFIO_DEVICE_GET_IRQ_INFO`` for one interrupt index."""

    index: int
    flags: vfio.IrqInfoFlags
    count: int


class VfioDevice:
    """The device ioctls and region accesses of one bound VFIO cdev (module docstring).

    ``fd`` is borrowed: its owner closes it.  ``ioctl_fn`` replaces
    :func:`fcntl.ioctl` (tests drive this class with a recorder).
    """

    def __init__(self, fd: int, name: str, *, ioctl_fn: RawIoctlFn | None = None) -> None:
        self.fd = fd
        self.name = name
        self._ioctl_fn = ioctl_fn

    def _call(self, request: vfio.VfioIoctl, buffer: bytearray) -> None:
        try:
            (self._ioctl_fn or fcntl.ioctl)(self.fd, request, buffer, True)
        except OSError as exc:
            err = exc.errno if exc.errno is not None else errno.EIO
            raise VfioDeviceError(err, request.name, f"{self.name} (fd {self.fd})") from None

    @staticmethod
    def _buffer(struct: UapiStruct, extra: int = 0) -> bytearray:
        return bytearray(struct.to_bytes()) + bytearray(extra)

    def info(self) -> VfioDeviceInfo:
        """``VFIO_DEVICE_GET_INFO``."""
        buffer = self._buffer(vfio.VfioDeviceInfo.sized())
        self._call(vfio.VfioIoctl.VFIO_DEVICE_GET_INFO, buffer)
        out = vfio.VfioDeviceInfo.from_buffer(buffer)
        return VfioDeviceInfo(vfio.DeviceFlags(out.flags), int(out.num_regions),
                              int(out.num_irqs))

    def region(self, index: int) -> VfioRegion:
        """``VFIO_DEVICE_GET_REGION_INFO``, asked again with the ``argsz`` its caps need."""
        argsz = _REGION_INFO_SIZE
        while True:
            head = vfio.VfioRegionInfo.sized()
            head.argsz = argsz
            head.index = index
            buffer = self._buffer(head, argsz - _REGION_INFO_SIZE)
            self._call(vfio.VfioIoctl.VFIO_DEVICE_GET_REGION_INFO, buffer)
            out = vfio.VfioRegionInfo.from_buffer_copy(buffer[:_REGION_INFO_SIZE])
            if out.argsz <= argsz:
                break
            argsz = int(out.argsz)
        flags = vfio.RegionInfoFlags(out.flags)
        caps = b""
        if flags & vfio.RegionInfoFlags.CAPS and out.cap_offset >= _REGION_INFO_SIZE:
            caps = bytes(buffer[_REGION_INFO_SIZE : int(out.argsz)])
        return VfioRegion(index, flags, int(out.size), int(out.offset), caps)

    def irq(self, index: int) -> VfioIrq:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        head = vfio.VfioIrqInfo.sized()
        head.index = index
        buffer = self._buffer(head)
        self._call(vfio.VfioIoctl.VFIO_DEVICE_GET_IRQ_INFO, buffer)
        out = vfio.VfioIrqInfo.from_buffer(buffer)
        return VfioIrq(index, vfio.IrqInfoFlags(out.flags), int(out.count))

    def set_irqs(self, index: int, flags: vfio.IrqSetFlags, start: int, count: int,
                 data: bytes = b"") -> None:
        """``VFIO_DEVICE_SET_IRQS`` with ``data`` (eventfds or bools) after the header."""
        head = vfio.VfioIrqSet.sized()
        head.argsz = _IRQ_SET_SIZE + len(data)
        head.flags = flags
        head.index = index
        head.start = start
        head.count = count
        buffer = bytearray(head.to_bytes()) + bytearray(data)
        self._call(vfio.VfioIoctl.VFIO_DEVICE_SET_IRQS, buffer)

    def set_irq_eventfds(self, index: int, start: int, fds: Sequence[int | None]) -> None:
        """Trigger eventfds for ``len(fds)`` vectors from ``start`` (None de-assigns one).

        VFIO takes its own reference to each eventfd: the caller may close its copy.
        """
        slots = (vfio.EVENTFD_SLOT * len(fds))(
            *[vfio.EVENTFD_NONE if fd is None else fd for fd in fds])
        flags = vfio.IrqSetFlags.DATA_EVENTFD | vfio.IrqSetFlags.ACTION_TRIGGER
        self.set_irqs(index, flags, start, len(fds), bytes(slots))

    def disable_irqs(self, index: int) -> None:
        """Tear down every trigger of ``index`` (DATA_NONE | TRIGGER with count 0)."""
        flags = vfio.IrqSetFlags.DATA_NONE | vfio.IrqSetFlags.ACTION_TRIGGER
        self.set_irqs(index, flags, 0, 0)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: a function-level reset of the device."""
        self._call(vfio.VfioIoctl.VFIO_DEVICE_RESET, bytearray())

    def read(self, region: VfioRegion, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` into ``region`` (the caller checked the bounds)."""
        try:
            data = os.pread(self.fd, size, region.offset + offset)
        except OSError as exc:
            where = f"{self.name} region {region.index} +{offset:#x}/{size}"
            raise VfioDeviceError(exc.errno or errno.EIO, "READ", where) from None
        if len(data) != size:
            raise VfioDeviceError(errno.EIO, "READ", f"{self.name} region {region.index} "
                                  f"+{offset:#x}: {len(data)} of {size} bytes")
        return data

    def write(self, region: VfioRegion, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` into ``region`` (the caller checked the bounds)."""
        try:
            done = os.pwrite(self.fd, data, region.offset + offset)
        except OSError as exc:
            raise VfioDeviceError(exc.errno or errno.EIO, "WRITE", f"{self.name} region "
                                  f"{region.index} +{offset:#x}/{len(data)}") from None
        if done != len(data):
            raise VfioDeviceError(errno.EIO, "WRITE", f"{self.name} region {region.index} "
                                  f"+{offset:#x}: {done} of {len(data)} bytes")
