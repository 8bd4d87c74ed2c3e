"""The raw ``/dev/iommu`` ioctl entry point of the sim (``iommufd_fops_ioctl``).

Each handler decodes the user's structure, calls the typed method of the
backend the :class:`IoctlTarget` interface names, and fills in the outputs,
so the raw ioctl and the typed API are one implementation.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import sys
from collections.abc import Callable
from typing import Any

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping, IommufdBackend, IommufdError
from vsmmu.iommufd.sim.invalidate import invalidation_bounds
from vsmmu.iommufd.sim.ioas import check_map_header
from vsmmu.iommufd.sim.objects import sim_error as _err


class IoctlTarget(IommufdBackend):
    """A backend the raw decoder drives: the typed API, plus invalidation of a raw array."""

    @abc.abstractmethod
    def invalidate_array(
        self, id_: int, array: bytes, entry_num: int, data_type: int, entry_len: int
    ) -> int:
        """``IOMMU_HWPT_INVALIDATE`` of ``entry_num`` entries of ``entry_len`` bytes each."""


def decode_ioctl(target: IoctlTarget, request: int, buf: bytearray) -> None:
    """Execute one /dev/iommu ioctl on ``buf``, the user's structure, mutated in place.

    Dispatch follows ``iommufd_fops_ioctl``: an unknown or unmodelled
    request is ENOTTY; the structure's leading ``size`` below the ioctl's
    min_size is EINVAL; a larger structure with a non-zero tail is E2BIG; a
    shorter one is zero-extended.  The decoded structure then goes through
    the same methods the typed API uses, and the outputs are copied back
    (``size`` bytes at most).  Pointers in the structure (``user_va``,
    ``data_uptr``...) are addresses in this process, as for the kernel; a
    NULL one is EFAULT, anything else is trusted.
    """
    handler = _IOCTL_HANDLERS.get(request)
    entry = uapi.IOCTL_STRUCTS.get(uapi.Ioctl(request)) if handler else None
    if handler is None or entry is None:
        raise _err(
            errno.ENOTTY, "IOCTL", f"request {request:#x}: not an iommufd ioctl the sim models"
        )
    cls, min_size = entry
    op = handler.__name__.removeprefix("_ioctl_").upper()
    size_field = ctypes.sizeof(ctypes.c_uint32)
    if len(buf) < size_field:
        raise _err(errno.EFAULT, op, f"buffer of {len(buf)} bytes holds no size field")
    user_size = int.from_bytes(buf[:size_field], "little")
    if user_size < min_size:
        raise _err(errno.EINVAL, op, f"size {user_size}: expected >= {min_size}")
    if len(buf) < user_size:
        raise _err(errno.EFAULT, op, f"size {user_size} beyond the {len(buf)}-byte buffer")
    kernel_size = ctypes.sizeof(cls)
    if any(buf[kernel_size:user_size]):
        raise _err(errno.E2BIG, op, f"size {user_size}: non-zero bytes past {kernel_size}")
    given = bytes(buf[: min(user_size, kernel_size)])
    cmd = cls.from_buffer_copy(given.ljust(kernel_size, b"\0"))
    respond = min(user_size, kernel_size)
    for name in _CHECKED_RESERVED.get(request, ()):
        if _nonzero(getattr(cmd, name)):
            if request == uapi.Ioctl.IOMMU_HWPT_INVALIDATE:
                # iommufd_hwpt_invalidate reports 0 entries handled on every failure.
                cmd.entry_num = 0
                buf[:respond] = cmd.to_bytes()[:respond]
            raise _err(errno.EOPNOTSUPP, op, f"{cls.C_NAME}.{name}: expected 0")
    try:
        handler(target, cmd)
    except IommufdError:
        # These two copy their outputs back even when failing (entry_num, num_iovas).
        if request in _RESPOND_ON_ERROR:
            buf[:respond] = cmd.to_bytes()[:respond]
        raise
    buf[:respond] = cmd.to_bytes()[:respond]



_PYBUF_WRITE = 0x200
"""CPython's PyBUF_WRITE: a writable memoryview over process memory."""
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def _nonzero(value: object) -> bool:
    if isinstance(value, int):
        return value != 0
    return any(bytes(value))  # type: ignore[call-overload]


def _user_memory(address: int, length: int, op: str, what: str) -> memoryview:
    """A writable view of ``length`` bytes of this process at ``address`` (EFAULT if NULL)."""
    if not address:
        raise _err(errno.EFAULT, op, f"{what}: NULL with length {length}")
    if length > sys.maxsize:
        raise _err(errno.EOVERFLOW, op, f"{what}: length {length:#x} too large")
    view: memoryview = _memory_view(address, length, _PYBUF_WRITE)
    return view


def _ioctl_destroy(sim: IoctlTarget, cmd: Any) -> None:
    sim.destroy(cmd.id)


def _ioctl_ioas_alloc(sim: IoctlTarget, cmd: Any) -> None:
    if cmd.flags:
        raise _err(errno.EOPNOTSUPP, "IOAS_ALLOC", f"flags {cmd.flags:#x}: expected 0")
    cmd.out_ioas_id = sim.ioas_alloc()


def _ioctl_ioas_map(sim: IoctlTarget, cmd: Any) -> None:
    # The header is judged before the user's memory is touched, as the kernel does.
    check_map_header(cmd.flags, cmd.iova, cmd.length)
    flags = uapi.IoasMapFlags(cmd.flags)
    fixed = bool(flags & uapi.IoasMapFlags.FIXED_IOVA)
    memory = _user_memory(cmd.user_va, cmd.length, "IOAS_MAP", "user_va")
    cmd.iova = sim.ioas_map(cmd.ioas_id, HostMapping(memory), cmd.iova if fixed else None, flags)


def _ioctl_ioas_unmap(sim: IoctlTarget, cmd: Any) -> None:
    cmd.length = sim.ioas_unmap(cmd.ioas_id, cmd.iova, cmd.length)


def _ioctl_ioas_iova_ranges(sim: IoctlTarget, cmd: Any) -> None:
    ranges, alignment = sim.ioas_iova_ranges(cmd.ioas_id)
    room = cmd.num_iovas
    cmd.num_iovas = len(ranges)
    cmd.out_iova_alignment = alignment
    # iommufd_ioas_iova_ranges copies out the ranges that fit, then says EMSGSIZE.
    fit = ranges[:room]
    if fit:
        entry = ctypes.sizeof(uapi.IommuIovaRange)
        out = _user_memory(cmd.allowed_iovas, len(fit) * entry, "IOAS_IOVA_RANGES",
                           "allowed_iovas")
        for index, (start, last) in enumerate(fit):
            out[index * entry : (index + 1) * entry] = uapi.IommuIovaRange(start, last).to_bytes()
    if room < len(ranges):
        raise _err(errno.EMSGSIZE, "IOAS_IOVA_RANGES", f"num_iovas {room}: {len(ranges)} needed")


def _ioctl_hwpt_alloc(sim: IoctlTarget, cmd: Any) -> None:
    data: list[int] | None = None
    if cmd.data_len and cmd.data_type != uapi.HwptDataType.NONE:
        # The driver reads at most its own structure (a longer data_len is EINVAL anyway).
        length = min(cmd.data_len, uapi.VSTE_SIZE)
        raw = bytes(_user_memory(cmd.data_uptr, length, "HWPT_ALLOC", "data_uptr"))
        raw = raw.ljust(-(-len(raw) // 8) * 8, b"\0")
        data = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
    cmd.out_hwpt_id = sim.hwpt_alloc(
        cmd.dev_id, cmd.pt_id, cmd.flags, data, data_type=cmd.data_type, data_len=cmd.data_len
    )


def _ioctl_get_hw_info(sim: IoctlTarget, cmd: Any) -> None:
    op = "GET_HW_INFO"
    # ~ of an IntFlag keeps only its defined bits, so the mask is taken on the int.
    if cmd.flags & ~int(uapi.HwInfoFlags.INPUT_TYPE):
        raise _err(errno.EOPNOTSUPP, op, f"flags {cmd.flags:#x}: expected INPUT_TYPE or 0")
    data_type = cmd.out_data_type if cmd.flags & uapi.HwInfoFlags.INPUT_TYPE else 0
    info = sim.hw_info(cmd.dev_id, data_type)
    if cmd.data_len:
        out = _user_memory(cmd.data_uptr, cmd.data_len, op, "data_uptr")
        copied = min(cmd.data_len, len(info.data))
        # The kernel zeroes what the user offered beyond its own structure.
        out[:] = info.data[:copied].ljust(cmd.data_len, b"\0")
    # ... and reports its own length, which may exceed the user's buffer.
    cmd.data_len = len(info.data)
    cmd.out_data_type = info.data_type
    cmd.out_capabilities = info.capabilities
    cmd.out_max_pasid_log2 = info.max_pasid_log2


def _ioctl_hwpt_invalidate(sim: IoctlTarget, cmd: Any) -> None:
    op = "HWPT_INVALIDATE"
    requested = cmd.entry_num
    cmd.entry_num = 0
    if requested and not cmd.data_uptr:
        raise _err(errno.EINVAL, op, f"entry_num {requested} without data_uptr")
    # Bounds before the array is read (invalidation_target checks them again in order).
    invalidation_bounds(requested, cmd.entry_len)
    array = bytes(_user_memory(cmd.data_uptr, requested * cmd.entry_len, op, "data_uptr")) \
        if requested else b""
    try:
        cmd.entry_num = sim.invalidate_array(cmd.hwpt_id, array, requested, cmd.data_type,
                                        cmd.entry_len)
    except IommufdError as exc:
        cmd.entry_num = exc.handled
        raise


def _ioctl_viommu_alloc(sim: IoctlTarget, cmd: Any) -> None:
    cmd.out_viommu_id = sim.viommu_alloc(cmd.dev_id, cmd.hwpt_id, cmd.type, cmd.flags)


def _ioctl_vdevice_alloc(sim: IoctlTarget, cmd: Any) -> None:
    cmd.out_vdevice_id = sim.vdevice_alloc(cmd.viommu_id, cmd.dev_id, cmd.virt_id)


def _ioctl_veventq_alloc(sim: IoctlTarget, cmd: Any) -> None:
    handle = sim.veventq_alloc(cmd.viommu_id, cmd.veventq_depth, cmd.type, cmd.flags)
    cmd.out_veventq_id = handle.id
    cmd.out_veventq_fd = handle.fd


_IOCTL_HANDLERS: dict[int, Callable[[IoctlTarget, Any], None]] = {
    uapi.Ioctl.IOMMU_DESTROY: _ioctl_destroy,
    uapi.Ioctl.IOMMU_IOAS_ALLOC: _ioctl_ioas_alloc,
    uapi.Ioctl.IOMMU_IOAS_MAP: _ioctl_ioas_map,
    uapi.Ioctl.IOMMU_IOAS_UNMAP: _ioctl_ioas_unmap,
    uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES: _ioctl_ioas_iova_ranges,
    uapi.Ioctl.IOMMU_HWPT_ALLOC: _ioctl_hwpt_alloc,
    uapi.Ioctl.IOMMU_GET_HW_INFO: _ioctl_get_hw_info,
    uapi.Ioctl.IOMMU_HWPT_INVALIDATE: _ioctl_hwpt_invalidate,
    uapi.Ioctl.IOMMU_VIOMMU_ALLOC: _ioctl_viommu_alloc,
    uapi.Ioctl.IOMMU_VDEVICE_ALLOC: _ioctl_vdevice_alloc,
    uapi.Ioctl.IOMMU_VEVENTQ_ALLOC: _ioctl_veventq_alloc,
}
"""Every /dev/iommu ioctl the sim models (each one a thin decoder over the typed method)."""

_CHECKED_RESERVED: dict[int, tuple[str, ...]] = {
    # Only these reserved fields are checked, each before anything else of its ioctl
    # (or beside a flags check with the same errno); VIOMMU_ALLOC's __reserved and
    # HWPT_ALLOC's __reserved2 are never looked at.
    uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES: ("reserved",),  # ioas.c:75
    uapi.Ioctl.IOMMU_IOAS_MAP: ("reserved",),  # ioas.c:255
    uapi.Ioctl.IOMMU_HWPT_ALLOC: ("reserved",),  # hw_pagetable.c:359
    uapi.Ioctl.IOMMU_HWPT_INVALIDATE: ("reserved",),  # hw_pagetable.c:521
    uapi.Ioctl.IOMMU_GET_HW_INFO: ("reserved",),  # device.c:1643
    uapi.Ioctl.IOMMU_VEVENTQ_ALLOC: ("reserved",),  # eventq.c:514
}

_RESPOND_ON_ERROR = frozenset({uapi.Ioctl.IOMMU_HWPT_INVALIDATE, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES})
