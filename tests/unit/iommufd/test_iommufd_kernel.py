"""The kernel backend without a kernel: each method's exact ioctl bytes and errno mapping.

:data:`vsmmu.iommufd.kernel.ioctl` is replaced by a recorder that checks the
request number and the structure it is handed, and plays the kernel's part
by writing outputs into the (mutable) structure or raising ``OSError``.
Expected bytes are written with :mod:`struct` format strings taken from the
C declarations, independently of the ctypes layouts under test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vsmmu.iommufd import kernel, uapi
from vsmmu.iommufd.backend import HostMapping, IommufdError, ObjType
from vsmmu.iommufd.kernel import KernelIommufd

Reply = Callable[[uapi.UapiStruct], None] | OSError


@dataclass
class Call:
    """One recorded ioctl."""

    fd: int
    request: int
    arg: uapi.UapiStruct
    raw: bytes


@dataclass
class Recorder:
    """Stands in for fcntl.ioctl; ``replies[request]`` plays the kernel."""

    calls: list[Call] = field(default_factory=list)
    replies: dict[int, list[Reply]] = field(default_factory=dict)

    def reply(self, request: int, *replies: Reply) -> None:
        self.replies.setdefault(request, []).extend(replies)

    def __call__(self, fd: int, request: int, arg: uapi.UapiStruct, mutate: bool) -> int:
        assert mutate is True, "outputs must land in the caller's structure"
        assert isinstance(arg, uapi.UapiStruct)
        size = ctypes.c_uint32.from_buffer(arg).value
        assert size == ctypes.sizeof(arg), f"{type(arg).__name__}: size field {size}"
        self.calls.append(Call(fd, request, arg, arg.to_bytes()))
        pending = self.replies.get(request)
        if pending:
            reply = pending.pop(0)
            if isinstance(reply, OSError):
                raise reply
            reply(arg)
        return 0

    def only(self, request: int) -> Call:
        matching = [c for c in self.calls if c.request == request]
        assert len(matching) == 1, f"{len(matching)} calls of {request:#x}"
        return matching[0]


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(kernel, "ioctl", recorder)
    return recorder


@pytest.fixture
def be(rec: Recorder) -> Iterator[KernelIommufd]:
    backend = KernelIommufd(fd=os.open(os.devnull, os.O_RDWR))
    yield backend
    backend.close()


def out(**values: int) -> Callable[[uapi.UapiStruct], None]:
    """A kernel reply writing output fields."""

    def write(arg: uapi.UapiStruct) -> None:
        for name, value in values.items():
            setattr(arg, name, value)

    return write


def bind(be: KernelIommufd, rec: Recorder, dev_id: int = 3) -> int:
    rec.reply(uapi.Ioctl.VFIO_DEVICE_BIND_IOMMUFD, out(out_devid=dev_id))
    return be.bind_vfio_cdev(os.devnull)


def test_ioctl_numbers_are_io_semicolon() -> None:
    assert int(uapi.Ioctl.IOMMU_HWPT_ALLOC) == 0x3B89
    assert int(uapi.Ioctl.VFIO_DEVICE_BIND_IOMMUFD) == 0x3B76


def test_bind_passes_the_iommufd_and_returns_out_devid(be: KernelIommufd, rec: Recorder) -> None:
    assert bind(be, rec, 7) == 7
    call = rec.only(uapi.Ioctl.VFIO_DEVICE_BIND_IOMMUFD)
    assert call.fd != be.fd
    assert call.raw == struct.pack("<IIiIQ", 24, 0, be.fd, 0, 0)
    assert [(o.id, o.type) for o in be.objects()] == [(7, ObjType.DEVICE)]


def test_bind_failure_closes_the_cdev(
    open_fds: Callable[[], int], be: KernelIommufd, rec: Recorder
) -> None:
    rec.reply(uapi.Ioctl.VFIO_DEVICE_BIND_IOMMUFD, OSError(errno.EBUSY, "busy"))
    before = open_fds()
    with pytest.raises(IommufdError) as info:
        be.bind_vfio_cdev(os.devnull)
    assert (info.value.errno, info.value.op) == (errno.EBUSY, "BIND_IOMMUFD")
    assert open_fds() == before


def test_bind_of_missing_cdev_is_open_enoent(be: KernelIommufd) -> None:
    with pytest.raises(IommufdError) as info:
        be.bind_vfio_cdev("/nonexistent/vfio0")
    assert (info.value.errno, info.value.op) == (errno.ENOENT, "OPEN")


def test_ioas_alloc_bytes_and_result(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_IOAS_ALLOC, out(out_ioas_id=5))
    assert be.ioas_alloc() == 5
    call = rec.only(uapi.Ioctl.IOMMU_IOAS_ALLOC)
    assert call.fd == be.fd
    assert call.raw == struct.pack("<III", 12, 0, 0)


def test_ioas_map_fixed_passes_user_va(be: KernelIommufd, rec: Recorder) -> None:
    ram = bytearray(0x3000)
    mapping = HostMapping(ram, offset=0x1000)
    assert be.ioas_map(2, mapping, iova=0x4000_0000) == 0x4000_0000
    call = rec.only(uapi.Ioctl.IOMMU_IOAS_MAP)
    flags = uapi.IoasMapFlags.FIXED_IOVA | uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE
    base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    assert call.raw == struct.pack("<IIIIQQQ", 40, flags, 2, 0, base + 0x1000, 0x2000, 0x4000_0000)


def test_ioas_map_anywhere_returns_the_kernel_iova(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_IOAS_MAP, out(iova=0x7000))
    flags = uapi.IoasMapFlags.READABLE
    assert be.ioas_map(2, HostMapping(bytearray(0x1000)), flags=flags) == 0x7000
    raw = rec.only(uapi.Ioctl.IOMMU_IOAS_MAP).raw
    assert struct.unpack_from("<I", raw, 4)[0] == uapi.IoasMapFlags.READABLE
    assert struct.unpack_from("<Q", raw, 32)[0] == 0


def test_ioas_unmap_returns_the_kernel_length(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_IOAS_UNMAP, out(length=0x3000))
    assert be.ioas_unmap(4, 0, uapi.U64_MAX) == 0x3000
    assert rec.only(uapi.Ioctl.IOMMU_IOAS_UNMAP).raw == struct.pack("<IIQQ", 24, 4, 0, uapi.U64_MAX)


def test_iova_ranges_retries_with_the_emsgsize_count(be: KernelIommufd, rec: Recorder) -> None:
    need = kernel.IOVA_RANGES_FIRST_GUESS + 2

    def too_small(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuIoasIovaRanges)
        arg.num_iovas = need
        raise OSError(errno.EMSGSIZE, "too small")

    def fill(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuIoasIovaRanges)
        assert arg.num_iovas == need
        ranges = (uapi.IommuIovaRange * need).from_address(arg.allowed_iovas)
        for i in range(need):
            ranges[i].start, ranges[i].last = i << 20, (i << 20) + 0xFFF
        arg.out_iova_alignment = 0x1000

    rec.reply(uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, too_small, fill)
    ranges, align = be.ioas_iova_ranges(9)
    assert align == 0x1000
    assert ranges == [(i << 20, (i << 20) + 0xFFF) for i in range(need)]


def test_hwpt_alloc_paging_bytes(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_HWPT_ALLOC, out(out_hwpt_id=11))
    flags = uapi.HwptAllocFlags.NEST_PARENT
    assert be.hwpt_alloc(3, 2, flags=flags) == 11
    raw = rec.only(uapi.Ioctl.IOMMU_HWPT_ALLOC).raw
    assert raw == struct.pack("<IIIIIIIIQII", 48, flags, 3, 2, 0, 0, 0, 0, 0, 0, 0)


def test_hwpt_alloc_nested_passes_the_vste(be: KernelIommufd, rec: Recorder) -> None:
    seen: list[bytes] = []

    def kernel_reads_vste(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuHwptAlloc)
        seen.append(ctypes.string_at(arg.data_uptr, arg.data_len))
        arg.out_hwpt_id = 12

    rec.reply(uapi.Ioctl.IOMMU_IOAS_ALLOC, out(out_ioas_id=2))
    rec.reply(uapi.Ioctl.IOMMU_VIOMMU_ALLOC, out(out_viommu_id=6))
    rec.reply(uapi.Ioctl.IOMMU_HWPT_ALLOC, kernel_reads_vste)
    be.ioas_alloc()
    viommu = be.viommu_alloc(3, 4)
    assert be.hwpt_alloc(3, viommu, data=(0x1234_5001, 0x8)) == 12
    raw = rec.only(uapi.Ioctl.IOMMU_HWPT_ALLOC).raw
    fields = struct.unpack("<IIIIIIIIQII", raw)
    assert fields[:8] == (48, 0, 3, viommu, 0, 0, uapi.HwptDataType.ARM_SMMUV3, uapi.VSTE_SIZE)
    assert seen == [struct.pack("<QQ", 0x1234_5001, 0x8)]
    assert {o.id: o.type for o in be.objects()}[12] == ObjType.HWPT_NESTED


def test_attach_replace_detach_go_to_the_cdev(be: KernelIommufd, rec: Recorder) -> None:
    dev = bind(be, rec)
    cdev = rec.calls[0].fd
    rec.reply(uapi.Ioctl.VFIO_DEVICE_ATTACH_IOMMUFD_PT, out(pt_id=20), out(pt_id=21))
    be.device_attach(dev, 2)
    be.device_replace(dev, 21)
    be.device_detach(dev)
    attaches = [c for c in rec.calls if c.request == uapi.Ioctl.VFIO_DEVICE_ATTACH_IOMMUFD_PT]
    assert [c.fd for c in attaches] == [cdev, cdev]
    assert [c.raw for c in attaches] == [struct.pack("<IIII", 16, 0, pt, 0) for pt in (2, 21)]
    detach = rec.only(uapi.Ioctl.VFIO_DEVICE_DETACH_IOMMUFD_PT)
    assert (detach.fd, detach.raw) == (cdev, struct.pack("<III", 12, 0, 0))


def test_replace_of_unattached_device_is_einval_without_ioctl(
    be: KernelIommufd, rec: Recorder
) -> None:
    dev = bind(be, rec)
    with pytest.raises(IommufdError) as info:
        be.device_replace(dev, 2)
    assert info.value.errno == errno.EINVAL
    assert not [c for c in rec.calls if c.request == uapi.Ioctl.VFIO_DEVICE_ATTACH_IOMMUFD_PT]


def test_attach_of_unbound_device_is_enoent(be: KernelIommufd) -> None:
    with pytest.raises(IommufdError) as info:
        be.device_attach(99, 1)
    assert (info.value.errno, info.value.op) == (errno.ENOENT, "ATTACH_IOMMUFD_PT")


def test_viommu_and_vdevice_bytes(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_VIOMMU_ALLOC, out(out_viommu_id=6))
    rec.reply(uapi.Ioctl.IOMMU_VDEVICE_ALLOC, out(out_vdevice_id=8))
    assert be.viommu_alloc(3, 4) == 6
    assert be.vdevice_alloc(6, 3, 0x21) == 8
    assert rec.only(uapi.Ioctl.IOMMU_VIOMMU_ALLOC).raw == struct.pack(
        "<IIIIIIIIQ", 40, 0, uapi.ViommuType.ARM_SMMUV3, 3, 4, 0, 0, 0, 0
    )
    assert rec.only(uapi.Ioctl.IOMMU_VDEVICE_ALLOC).raw == struct.pack("<IIIIQ", 24, 6, 3, 0, 0x21)


def test_invalidate_passes_the_array_and_returns_entry_num(
    be: KernelIommufd, rec: Recorder
) -> None:
    entries = [(0x11, 0x22), (0x33, 0x44)]
    seen: list[bytes] = []

    def kernel_reads(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuHwptInvalidate)
        seen.append(ctypes.string_at(arg.data_uptr, arg.entry_len * arg.entry_num))

    rec.reply(uapi.Ioctl.IOMMU_HWPT_INVALIDATE, kernel_reads)
    assert be.hwpt_invalidate(6, entries) == 2
    raw = rec.only(uapi.Ioctl.IOMMU_HWPT_INVALIDATE).raw
    size, hwpt, _, data_type, entry_len, entry_num, reserved = struct.unpack("<IIQIIII", raw)
    assert (size, hwpt, data_type, entry_len, entry_num, reserved) == (
        32,
        6,
        uapi.HwptInvalidateDataType.ARM_SMMUV3,
        16,
        2,
        0,
    )
    assert seen == [struct.pack("<QQQQ", 0x11, 0x22, 0x33, 0x44)]


def test_invalidate_failure_reports_the_kernel_handled_count(
    be: KernelIommufd, rec: Recorder
) -> None:
    def fail_at_one(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuHwptInvalidate)
        arg.entry_num = 1
        raise OSError(errno.EIO, "bad command")

    rec.reply(uapi.Ioctl.IOMMU_HWPT_INVALIDATE, fail_at_one)
    with pytest.raises(IommufdError) as info:
        be.hwpt_invalidate(6, [(0x11, 0), (0x99, 0), (0x11, 0)])
    assert (info.value.errno, info.value.op, info.value.handled) == (
        errno.EIO,
        "HWPT_INVALIDATE",
        1,
    )


def test_veventq_fd_is_returned_as_is(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_VEVENTQ_ALLOC, out(out_veventq_id=9, out_veventq_fd=42))
    q = be.veventq_alloc(6, 64)
    assert (q.id, q.fd) == (9, 42)
    assert rec.only(uapi.Ioctl.IOMMU_VEVENTQ_ALLOC).raw == struct.pack(
        "<IIIIIIII", 32, 0, 6, uapi.VeventqType.ARM_SMMUV3, 64, 0, 0, 0
    )


def test_hw_info_decodes_the_arm_data(be: KernelIommufd, rec: Recorder) -> None:
    def kernel_fills(arg: uapi.UapiStruct) -> None:
        assert isinstance(arg, uapi.IommuHwInfo)
        assert arg.data_len == ctypes.sizeof(uapi.IommuHwInfoArmSmmuv3)
        info = uapi.IommuHwInfoArmSmmuv3.from_address(arg.data_uptr)
        info.idr[0] = 0x0D44101A
        info.iidr = 0x43B
        arg.out_data_type = uapi.HwInfoType.ARM_SMMUV3
        arg.out_capabilities = uapi.HwCapabilities.PCI_ATS_NOT_SUPPORTED
        arg.out_max_pasid_log2 = 20

    rec.reply(uapi.Ioctl.IOMMU_GET_HW_INFO, kernel_fills)
    info = be.hw_info(3)
    assert info.data_type == uapi.HwInfoType.ARM_SMMUV3
    assert info.arm_smmuv3().idr[0] == 0x0D44101A and info.arm_smmuv3().iidr == 0x43B
    assert info.capabilities == uapi.HwCapabilities.PCI_ATS_NOT_SUPPORTED
    assert info.max_pasid_log2 == 20
    raw = rec.only(uapi.Ioctl.IOMMU_GET_HW_INFO).raw
    assert struct.unpack_from("<IIII", raw) == (40, 0, 3, 40)


def test_hw_info_with_a_type_sets_input_type(be: KernelIommufd, rec: Recorder) -> None:
    rec.reply(uapi.Ioctl.IOMMU_GET_HW_INFO, out(out_data_type=uapi.HwInfoType.ARM_SMMUV3))
    be.hw_info(3, uapi.HwInfoType.ARM_SMMUV3)
    raw = rec.only(uapi.Ioctl.IOMMU_GET_HW_INFO).raw
    assert struct.unpack_from("<I", raw, 4)[0] == uapi.HwInfoFlags.INPUT_TYPE
    assert struct.unpack_from("<I", raw, 24)[0] == uapi.HwInfoType.ARM_SMMUV3


@pytest.mark.parametrize(
    ("err", "op", "call"),
    [
        (errno.ENOENT, "DESTROY", lambda b: b.destroy(77)),
        (errno.EBUSY, "DESTROY", lambda b: b.destroy(1)),
        (errno.EINVAL, "HWPT_ALLOC", lambda b: b.hwpt_alloc(1, 999)),
        (errno.EIO, "HWPT_ALLOC", lambda b: b.hwpt_alloc(1, 2, data=(1, 0))),
        (errno.EEXIST, "IOAS_MAP", lambda b: b.ioas_map(1, HostMapping(bytearray(4096)), iova=0)),
        (errno.EOPNOTSUPP, "VIOMMU_ALLOC", lambda b: b.viommu_alloc(1, 2)),
        (errno.EEXIST, "VDEVICE_ALLOC", lambda b: b.vdevice_alloc(1, 2, 3)),
        (errno.EINVAL, "VEVENTQ_ALLOC", lambda b: b.veventq_alloc(1, 0)),
        (errno.EOPNOTSUPP, "GET_HW_INFO", lambda b: b.hw_info(1)),
        (errno.ENOENT, "IOAS_UNMAP", lambda b: b.ioas_unmap(1, 0, 4096)),
        (errno.ENOMEM, "IOAS_ALLOC", lambda b: b.ioas_alloc()),
    ],
)
def test_oserror_becomes_iommufd_error_with_errno_and_op(
    be: KernelIommufd,
    rec: Recorder,
    err: int,
    op: str,
    call: Callable[[KernelIommufd], object],
) -> None:
    for request in uapi.Ioctl:
        rec.reply(request, OSError(err, os.strerror(err)))
    with pytest.raises(IommufdError) as info:
        call(be)
    assert (info.value.errno, info.value.op) == (err, op)
    assert op in str(info.value) and errno.errorcode[err] in str(info.value)


def test_object_table_tracks_creations_users_and_destroys(be: KernelIommufd, rec: Recorder) -> None:
    dev = bind(be, rec, 1)
    rec.reply(uapi.Ioctl.IOMMU_IOAS_ALLOC, out(out_ioas_id=2))
    rec.reply(uapi.Ioctl.IOMMU_HWPT_ALLOC, out(out_hwpt_id=3))
    rec.reply(uapi.Ioctl.IOMMU_VIOMMU_ALLOC, out(out_viommu_id=4))
    ioas = be.ioas_alloc()
    s2 = be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
    viommu = be.viommu_alloc(dev, s2)
    table = {o.id: (o.type, o.users) for o in be.objects()}
    assert table == {
        1: (ObjType.DEVICE, 0),
        2: (ObjType.IOAS, 1),
        3: (ObjType.HWPT_PAGING, 1),
        4: (ObjType.VIOMMU, 0),
    }
    be.destroy(viommu)
    assert [o.id for o in be.objects()] == [1, 2, 3]
    assert rec.only(uapi.Ioctl.IOMMU_DESTROY).raw == struct.pack("<II", 8, viommu)


def test_close_closes_the_iommufd_and_cdevs(open_fds: Callable[[], int], rec: Recorder) -> None:
    before = open_fds()
    be = KernelIommufd(os.devnull)
    bind(be, rec)
    assert open_fds() == before + 2
    be.close()
    assert open_fds() == before


def test_real_fcntl_errno_reaches_the_caller() -> None:
    """Unpatched: /dev/null answers every iommufd ioctl with ENOTTY."""
    be = KernelIommufd(os.devnull)
    try:
        with pytest.raises(IommufdError) as info:
            be.ioas_alloc()
        assert (info.value.errno, info.value.op) == (errno.ENOTTY, "IOAS_ALLOC")
    finally:
        be.close()
