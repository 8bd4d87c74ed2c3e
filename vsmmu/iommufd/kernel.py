"""The kernel iommufd backend: :class:`IommufdBackend` over real ioctls on ``/dev/iommu``.

Every method fills one :mod:`vsmmu.iommufd.uapi` structure (leading ``size``
set to the structure's size), passes it to :func:`ioctl` as a mutable buffer
(the kernel's outputs land in the same structure) and turns an
:class:`OSError` into :class:`IommufdError` carrying the same errno and the
ioctl's name.

Devices are VFIO cdevs (``/dev/vfio/devices/vfioN``) bound to this iommufd
with :meth:`KernelIommufd.bind_vfio_cdev`; attach, replace and detach go
through the cdev's ``VFIO_DEVICE_{ATTACH,DETACH}_IOMMUFD_PT``.  Closing the
cdev unbinds the device.

The kernel has no ioctl that lists objects, so :meth:`KernelIommufd.objects`
reports what *this* backend created and has not destroyed, with users counted
from the dependencies it knows about (objects made by other users of the same
fd, and the kernel's automatic HWPTs, are not listed).

A vEVENTQ fd is returned as the kernel gave it: the caller owns and closes it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import (
    HostMapping,
    HwInfo,
    InvalidationCommand,
    IommufdBackend,
    IommufdError,
    ObjectInfo,
    ObjType,
    VeventqHandle,
    Vste,
    check_invalidation_words,
)

log = logging.getLogger(__name__)

DEV_IOMMU = "/dev/iommu"
"""The iommufd character device."""

IOVA_RANGES_FIRST_GUESS = 8
"""Ranges allowed for in the first IOAS_IOVA_RANGES call (EMSGSIZE tells the real count)."""

IoctlFn = Callable[[int, int, uapi.UapiStruct, bool], object]
"""``fcntl.ioctl(fd, request, mutable_buffer, True)``'s shape."""

ioctl: IoctlFn = fcntl.ioctl
ReadFn = Callable[[int, int], bytes]
"""``os.read``'s signature: how this backend reads a vEVENTQ fd."""
"""The ioctl function used by default for every request (tests replace it with a recorder)."""


@dataclass
class TrackedObject:
    """An object this backend created: its kind, what it depends on, its details."""

    id: int
    type: ObjType
    depends_on: tuple[int, ...] = ()
    detail: dict[str, int | str | None] = field(default_factory=dict)


def _array_u64(words: Sequence[int], min_bytes: int) -> ctypes.Array[ctypes.c_uint64]:
    """A u64 array holding ``words`` and at least ``min_bytes`` bytes (zero tail)."""
    count = max(len(words), -(-min_bytes // ctypes.sizeof(ctypes.c_uint64)))
    return (ctypes.c_uint64 * count)(*words)


class KernelIommufd(IommufdBackend):
    """iommufd through ``/dev/iommu`` (see the module docstring).

    ``fd``: use an already open iommufd (it is then owned by this backend and
    closed by :meth:`close`); otherwise ``path`` is opened read-write.
    ``ioctl_fn`` replaces :func:`fcntl.ioctl` (e.g. to drive the sim's raw
    ioctl path with exactly the structures this backend builds), and
    ``read_fn`` replaces :func:`os.read` on the vEVENTQ fds it returns.
    Raises :class:`IommufdError` (op ``OPEN``) if the device cannot be opened.
    """

    name = "kernel"

    def __init__(
        self, path: str = DEV_IOMMU, *, fd: int | None = None, ioctl_fn: IoctlFn | None = None,
        read_fn: ReadFn = os.read,
    ) -> None:
        self._ioctl_fn = ioctl_fn
        self._read_fn = read_fn
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise IommufdError(
                    exc.errno or errno.ENODEV, "OPEN", f"{path}: {exc.strerror}"
                ) from None
        self.fd = fd
        self._objects: dict[int, TrackedObject] = {}
        self._cdev_fds: dict[int, int] = {}
        self._attached: dict[int, int] = {}
        self._mappings: dict[tuple[int, int], HostMapping] = {}

    # --- the one ioctl path ---

    @property
    def ioctl_function(self) -> IoctlFn:
        """The ioctl function this backend issues every request with (devices' too)."""
        return self._ioctl_fn or ioctl

    def _call(self, fd: int, request: uapi.Ioctl, arg: uapi.UapiStruct, op: str) -> None:
        """Issue ``request`` with ``arg`` (mutated in place); OSError → IommufdError."""
        try:
            (self._ioctl_fn or ioctl)(fd, request, arg, True)
        except OSError as exc:
            err = exc.errno if exc.errno is not None else errno.EIO
            message = f"{request.name} on fd {fd} with {self._describe(arg)}"
            raise IommufdError(err, op, message) from None
        log.debug("iommufd kernel %s: %s", op, self._describe(arg))

    @staticmethod
    def _describe(arg: uapi.UapiStruct) -> str:
        names = [name for name, *_ in arg._fields_]
        parts = []
        for name in names:
            value = getattr(arg, name)
            parts.append(f"{name}={value:#x}" if isinstance(value, int) else f"{name}=[..]")
        return f"{type(arg).C_NAME} {' '.join(parts)}"

    def _track(self, obj: TrackedObject) -> int:
        self._objects[obj.id] = obj
        return obj.id

    def _cdev(self, dev_id: int, op: str) -> int:
        cdev = self._cdev_fds.get(dev_id)
        if cdev is None:
            raise IommufdError(errno.ENOENT, op, f"dev_id {dev_id}: not bound by this backend")
        return cdev

    # --- devices (VFIO cdev) ---

    def bind_vfio_cdev(self, path: str) -> int:
        """Open the VFIO cdev ``path`` and bind it to this iommufd; return its dev_id.

        Raises IommufdError with op ``OPEN`` (cannot open) or ``BIND_IOMMUFD``.
        """
        try:
            cdev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise IommufdError(
                    exc.errno or errno.ENODEV, "OPEN", f"{path}: {exc.strerror}"
                ) from None
        bind = uapi.VfioDeviceBindIommufd.sized()
        bind.iommufd = self.fd
        try:
            self._call(cdev, uapi.Ioctl.VFIO_DEVICE_BIND_IOMMUFD, bind, "BIND_IOMMUFD")
        except IommufdError:
            os.close(cdev)
            raise
        dev_id = int(bind.out_devid)
        self._cdev_fds[dev_id] = cdev
        return self._track(TrackedObject(dev_id, ObjType.DEVICE, detail={"cdev": path}))

    def cdev_fd(self, dev_id: int) -> int:
        """The open VFIO cdev of a device bound here (owned by this backend; don't close it).

        Raises IommufdError (ENOENT) for a dev_id this backend did not bind.
        """
        return self._cdev(dev_id, "CDEV")

    def unbind_vfio_cdev(self, dev_id: int) -> None:
        """Close the device's cdev, which unbinds it from the iommufd."""
        cdev = self._cdev(dev_id, "UNBIND")
        os.close(cdev)
        del self._cdev_fds[dev_id]
        self._attached.pop(dev_id, None)
        self._objects.pop(dev_id, None)

    def hw_info(self, dev_id: int, data_type: int = uapi.HwInfoType.DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO``; a non-default ``data_type`` is passed with INPUT_TYPE."""
        data = uapi.IommuHwInfoArmSmmuv3()
        cmd = uapi.IommuHwInfo.sized()
        cmd.dev_id = dev_id
        cmd.data_len = ctypes.sizeof(data)
        cmd.data_uptr = ctypes.addressof(data)
        if data_type != uapi.HwInfoType.DEFAULT:
            cmd.flags = uapi.HwInfoFlags.INPUT_TYPE
            cmd.out_data_type = data_type
        self._call(self.fd, uapi.Ioctl.IOMMU_GET_HW_INFO, cmd, "GET_HW_INFO")
        length = min(int(cmd.data_len), ctypes.sizeof(data))
        try:
            out_type = uapi.HwInfoType(cmd.out_data_type)
        except ValueError:
            raise IommufdError(
                errno.EPROTO, "GET_HW_INFO", f"out_data_type {cmd.out_data_type}: unknown"
            ) from None
        return HwInfo(
            out_type,
            data.to_bytes()[:length],
            uapi.HwCapabilities(cmd.out_capabilities),
            int(cmd.out_max_pasid_log2),
        )

    # --- IOAS ---

    def ioas_alloc(self) -> int:
        """``IOMMU_IOAS_ALLOC``."""
        cmd = uapi.IommuIoasAlloc.sized()
        self._call(self.fd, uapi.Ioctl.IOMMU_IOAS_ALLOC, cmd, "IOAS_ALLOC")
        return self._track(TrackedObject(int(cmd.out_ioas_id), ObjType.IOAS))

    def ioas_map(
        self,
        ioas_id: int,
        mapping: HostMapping,
        iova: int | None = None,
        flags: uapi.IoasMapFlags = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE,
    ) -> int:
        """``IOMMU_IOAS_MAP`` of ``mapping.user_va`` (FIXED_IOVA when ``iova`` is given).

        The mapping is kept referenced until it is unmapped, so its buffer
        outlives the kernel's pin.
        """
        cmd = uapi.IommuIoasMap.sized()
        if iova is not None:
            flags |= uapi.IoasMapFlags.FIXED_IOVA
            cmd.iova = iova
        cmd.flags = flags
        cmd.ioas_id = ioas_id
        cmd.user_va = mapping.user_va
        cmd.length = mapping.length
        self._call(self.fd, uapi.Ioctl.IOMMU_IOAS_MAP, cmd, "IOAS_MAP")
        self._mappings[(ioas_id, int(cmd.iova))] = mapping
        return int(cmd.iova)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: the kernel returns the unmapped length in ``length``."""
        cmd = uapi.IommuIoasUnmap.sized()
        cmd.ioas_id = ioas_id
        cmd.iova = iova
        cmd.length = length
        self._call(self.fd, uapi.Ioctl.IOMMU_IOAS_UNMAP, cmd, "IOAS_UNMAP")
        last = iova + length - 1
        for key in [k for k in self._mappings if k[0] == ioas_id and iova <= k[1] <= last]:
            del self._mappings[key]
        return int(cmd.length)

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """``IOMMU_IOAS_IOVA_RANGES``, retried once with the count EMSGSIZE reports."""
        capacity = IOVA_RANGES_FIRST_GUESS
        while True:
            ranges = (uapi.IommuIovaRange * capacity)()
            cmd = uapi.IommuIoasIovaRanges.sized()
            cmd.ioas_id = ioas_id
            cmd.num_iovas = capacity
            cmd.allowed_iovas = ctypes.addressof(ranges)
            try:
                self._call(self.fd, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, cmd, "IOAS_IOVA_RANGES")
            except IommufdError as exc:
                if exc.errno != errno.EMSGSIZE or cmd.num_iovas <= capacity:
                    raise
                capacity = int(cmd.num_iovas)
                continue
            count = int(cmd.num_iovas)
            found = [(int(r.start), int(r.last)) for r in ranges[:count]]
            return found, int(cmd.out_iova_alignment)

    # --- HWPT ---

    def hwpt_alloc(
        self,
        dev_id: int,
        pt_id: int,
        flags: int = 0,
        data: Vste | None = None,
        data_type: int | None = None,
        data_len: int | None = None,
    ) -> int:
        """``IOMMU_HWPT_ALLOC``: paging on an IOAS, or nested (``data`` = vSTE) on a vIOMMU."""
        words = list(data) if data is not None else []
        if data_type is None:
            data_type = uapi.HwptDataType.ARM_SMMUV3 if data is not None else uapi.HwptDataType.NONE
        if data_len is None:
            data_len = uapi.VSTE_SIZE if data is not None else 0
        buffer = _array_u64(words, data_len)
        cmd = uapi.IommuHwptAlloc.sized()
        cmd.flags = flags
        cmd.dev_id = dev_id
        cmd.pt_id = pt_id
        cmd.data_type = data_type
        cmd.data_len = data_len
        cmd.data_uptr = ctypes.addressof(buffer) if data_len else 0
        self._call(self.fd, uapi.Ioctl.IOMMU_HWPT_ALLOC, cmd, "HWPT_ALLOC")
        parent = self._objects.get(pt_id)
        nested = parent is not None and parent.type == ObjType.VIOMMU
        kind = ObjType.HWPT_NESTED if nested else ObjType.HWPT_PAGING
        detail: dict[str, int | str | None] = {"pt": pt_id, "flags": flags}
        if nested and len(words) >= len(uapi.IommuHwptArmSmmuv3().ste):
            detail["ste0"], detail["ste1"] = f"{words[0]:#018x}", f"{words[1]:#018x}"
        return self._track(TrackedObject(int(cmd.out_hwpt_id), kind, (pt_id,), detail))

    # --- attach (VFIO cdev) ---

    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` (a replace when already attached)."""
        op = "ATTACH_IOMMUFD_PT"
        cdev = self._cdev(dev_id, op)
        cmd = uapi.VfioDeviceAttachIommufdPt.sized()
        cmd.pt_id = pt_id
        self._call(cdev, uapi.Ioctl.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd, op)
        # The kernel writes back the HWPT actually attached (an auto HWPT for an IOAS).
        self._attached[dev_id] = pt_id
        self._objects[dev_id].detail["pt"] = pt_id
        self._objects[dev_id].detail["hwpt"] = int(cmd.pt_id)
        return int(cmd.pt_id)

    def device_replace(self, dev_id: int, pt_id: int) -> None:
        """Replace the page table of an attached device (EINVAL if it is not attached)."""
        self._cdev(dev_id, "REPLACE")
        if dev_id not in self._attached:
            raise IommufdError(errno.EINVAL, "REPLACE", f"dev {dev_id}: not attached")
        self.device_attach(dev_id, pt_id)

    def device_detach(self, dev_id: int) -> None:
        """``VFIO_DEVICE_DETACH_IOMMUFD_PT``."""
        op = "DETACH_IOMMUFD_PT"
        cdev = self._cdev(dev_id, op)
        cmd = uapi.VfioDeviceDetachIommufdPt.sized()
        self._call(cdev, uapi.Ioctl.VFIO_DEVICE_DETACH_IOMMUFD_PT, cmd, op)
        self._attached.pop(dev_id, None)
        self._objects[dev_id].detail.pop("pt", None)
        self._objects[dev_id].detail.pop("hwpt", None)

    # --- vIOMMU, vDEVICE ---

    def viommu_alloc(
        self, dev_id: int, hwpt_id: int, type_: int = uapi.ViommuType.ARM_SMMUV3, flags: int = 0
    ) -> int:
        """``IOMMU_VIOMMU_ALLOC`` on the nest-parent ``hwpt_id``."""
        cmd = uapi.IommuViommuAlloc.sized()
        cmd.flags = flags
        cmd.type = type_
        cmd.dev_id = dev_id
        cmd.hwpt_id = hwpt_id
        self._call(self.fd, uapi.Ioctl.IOMMU_VIOMMU_ALLOC, cmd, "VIOMMU_ALLOC")
        detail: dict[str, int | str | None] = {"hwpt": hwpt_id, "type": type_}
        obj = TrackedObject(int(cmd.out_viommu_id), ObjType.VIOMMU, (hwpt_id,), detail)
        return self._track(obj)

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """``IOMMU_VDEVICE_ALLOC``."""
        cmd = uapi.IommuVdeviceAlloc.sized()
        cmd.viommu_id = viommu_id
        cmd.dev_id = dev_id
        if not 0 <= virt_id <= uapi.U64_MAX:
            raise IommufdError(errno.EINVAL, "VDEVICE_ALLOC", f"virt_id {virt_id:#x}: not a u64")
        cmd.virt_id = virt_id
        self._call(self.fd, uapi.Ioctl.IOMMU_VDEVICE_ALLOC, cmd, "VDEVICE_ALLOC")
        detail: dict[str, int | str | None] = {"viommu": viommu_id, "dev": dev_id,
                                               "virt_id": virt_id}
        obj = TrackedObject(int(cmd.out_vdevice_id), ObjType.VDEVICE, (viommu_id,), detail)
        return self._track(obj)

    # --- invalidation ---

    def hwpt_invalidate(
        self,
        id_: int,
        entries: Sequence[InvalidationCommand],
        data_type: int = uapi.HwptInvalidateDataType.ARM_SMMUV3,
        entry_len: int = uapi.ARM_INVALIDATE_ENTRY_SIZE,
    ) -> int:
        """``IOMMU_HWPT_INVALIDATE``; on failure ``handled`` is the kernel's ``entry_num``."""
        op = "HWPT_INVALIDATE"
        check_invalidation_words(entries, op)
        array = (ctypes.c_char * max(1, entry_len * len(entries)))()
        for index, (w0, w1) in enumerate(entries):
            raw = uapi.IommuViommuArmSmmuv3Invalidate()
            raw.cmd[0], raw.cmd[1] = w0, w1
            chunk = raw.to_bytes()[:entry_len].ljust(entry_len, b"\0")
            ctypes.memmove(ctypes.addressof(array) + index * entry_len, chunk, entry_len)
        cmd = uapi.IommuHwptInvalidate.sized()
        cmd.hwpt_id = id_
        cmd.data_uptr = ctypes.addressof(array) if entries else 0
        cmd.data_type = data_type
        cmd.entry_len = entry_len
        cmd.entry_num = len(entries)
        try:
            self._call(self.fd, uapi.Ioctl.IOMMU_HWPT_INVALIDATE, cmd, op)
        except IommufdError as exc:
            # iommufd_hwpt_invalidate copies entry_num (handled so far) back even on failure.
            exc.handled = int(cmd.entry_num)
            raise
        return int(cmd.entry_num)

    # --- vEVENTQ ---

    def veventq_alloc(
        self,
        viommu_id: int,
        depth: int,
        type_: int = uapi.VeventqType.ARM_SMMUV3,
        flags: int = 0,
    ) -> VeventqHandle:
        """``IOMMU_VEVENTQ_ALLOC``: the kernel's fd is returned as is (the caller closes it)."""
        cmd = uapi.IommuVeventqAlloc.sized()
        cmd.flags = flags
        cmd.viommu_id = viommu_id
        cmd.type = type_
        cmd.veventq_depth = depth
        self._call(self.fd, uapi.Ioctl.IOMMU_VEVENTQ_ALLOC, cmd, "VEVENTQ_ALLOC")
        q = VeventqHandle(int(cmd.out_veventq_id), int(cmd.out_veventq_fd))
        detail: dict[str, int | str | None] = {"viommu": viommu_id, "depth": depth, "fd": q.fd}
        self._track(TrackedObject(q.id, ObjType.VEVENTQ, (viommu_id,), detail))
        return q

    def veventq_read(self, fd: int, count: int) -> bytes:
        """``read(2)`` of the vEVENTQ fd: the kernel's own rules."""
        try:
            return self._read_fn(fd, count)
        except OSError as exc:
            raise IommufdError(exc.errno if exc.errno is not None else errno.EIO, "VEVENTQ_READ",
                               f"read of {count} bytes from fd {fd}") from None

    # --- destroy and the object table ---

    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY``."""
        cmd = uapi.IommuDestroy.sized()
        cmd.id = obj_id
        self._call(self.fd, uapi.Ioctl.IOMMU_DESTROY, cmd, "DESTROY")
        obj = self._objects.pop(obj_id, None)
        if obj is not None and obj.type == ObjType.IOAS:
            for key in [k for k in self._mappings if k[0] == obj_id]:
                del self._mappings[key]

    def objects(self) -> list[ObjectInfo]:
        """What this backend created, ordered by id (users from known dependencies)."""
        users: dict[int, int] = {}
        for obj in self._objects.values():
            for dep in obj.depends_on:
                users[dep] = users.get(dep, 0) + 1
        for pt_id in self._attached.values():
            users[pt_id] = users.get(pt_id, 0) + 1
        return [
            ObjectInfo(o.id, o.type, users.get(o.id, 0), dict(o.detail))
            for o in sorted(self._objects.values(), key=lambda o: o.id)
        ]

    def close(self) -> None:
        """Close every bound cdev and the iommufd (the kernel then frees every object)."""
        for cdev in self._cdev_fds.values():
            os.close(cdev)
        self._cdev_fds.clear()
        self._attached.clear()
        self._mappings.clear()
        self._objects.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
