"""The iommufd and VFIO-cdev user API as ctypes structures, enums and ioctl numbers.

Everything here mirrors ``include/uapi/linux/iommufd.h`` and the cdev part of
``include/uapi/linux/vfio.h`` (Linux 7.x, see DESIGN.md §7).  The structures
are :class:`ctypes.Structure` subclasses so that the kernel backend passes
them to :func:`fcntl.ioctl` unchanged and the simulated backend decodes the
very same bytes.  Python field names equal the C member names, except that a
C ``__reserved`` becomes ``reserved`` (``__reserved2`` → ``reserved2``):
:data:`C_FIELD_NAMES` gives the C spelling, which the header cross-check
(``tests/unit/iommufd/test_iommufd_headers.py``) compiles against the kernel
headers of a recent Debian ``linux-libc-dev``.

Enums are :class:`enum.IntEnum` / :class:`enum.IntFlag` so that they print by
name; :data:`ENUM_C_PREFIX` maps each to the prefix of its C constants.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final, TypeVar

from vsmmu.arch.ste import STE

# --- ioctl number encoding (asm-generic/ioctl.h; _IO has no size or direction) ---

IOC_NRBITS: Final = 8
IOC_TYPESHIFT: Final = IOC_NRBITS

IOMMUFD_TYPE: Final = ord(";")
VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100


def io(type_: int, nr: int) -> int:
    """Return the number of ``_IO(type_, nr)``: no direction, no size bits."""
    return (type_ << IOC_TYPESHIFT) | nr


class IommufdCmd(enum.IntEnum):
    """``IOMMUFD_CMD_*``: the command numbers behind every iommufd ioctl."""

    DESTROY = 0x80
    IOAS_ALLOC = 0x81
    IOAS_ALLOW_IOVAS = 0x82
    IOAS_COPY = 0x83
    IOAS_IOVA_RANGES = 0x84
    IOAS_MAP = 0x85
    IOAS_UNMAP = 0x86
    OPTION = 0x87
    VFIO_IOAS = 0x88
    HWPT_ALLOC = 0x89
    GET_HW_INFO = 0x8A
    HWPT_SET_DIRTY_TRACKING = 0x8B
    HWPT_GET_DIRTY_BITMAP = 0x8C
    HWPT_INVALIDATE = 0x8D
    FAULT_QUEUE_ALLOC = 0x8E
    IOAS_MAP_FILE = 0x8F
    VIOMMU_ALLOC = 0x90
    VDEVICE_ALLOC = 0x91
    IOAS_CHANGE_PROCESS = 0x92
    VEVENTQ_ALLOC = 0x93
    HW_QUEUE_ALLOC = 0x94


class Ioctl(enum.IntEnum):
    """Full ioctl request numbers (``IOMMU_*`` on /dev/iommu, ``VFIO_DEVICE_*`` on a cdev)."""

    IOMMU_DESTROY = io(IOMMUFD_TYPE, IommufdCmd.DESTROY)
    IOMMU_IOAS_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.IOAS_ALLOC)
    IOMMU_IOAS_IOVA_RANGES = io(IOMMUFD_TYPE, IommufdCmd.IOAS_IOVA_RANGES)
    IOMMU_IOAS_MAP = io(IOMMUFD_TYPE, IommufdCmd.IOAS_MAP)
    IOMMU_IOAS_UNMAP = io(IOMMUFD_TYPE, IommufdCmd.IOAS_UNMAP)
    IOMMU_HWPT_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.HWPT_ALLOC)
    IOMMU_GET_HW_INFO = io(IOMMUFD_TYPE, IommufdCmd.GET_HW_INFO)
    IOMMU_HWPT_INVALIDATE = io(IOMMUFD_TYPE, IommufdCmd.HWPT_INVALIDATE)
    IOMMU_VIOMMU_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.VIOMMU_ALLOC)
    IOMMU_VDEVICE_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.VDEVICE_ALLOC)
    IOMMU_VEVENTQ_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.VEVENTQ_ALLOC)
    IOMMU_HW_QUEUE_ALLOC = io(IOMMUFD_TYPE, IommufdCmd.HW_QUEUE_ALLOC)
    VFIO_DEVICE_BIND_IOMMUFD = io(VFIO_TYPE, VFIO_BASE + 18)
    VFIO_DEVICE_ATTACH_IOMMUFD_PT = io(VFIO_TYPE, VFIO_BASE + 19)
    VFIO_DEVICE_DETACH_IOMMUFD_PT = io(VFIO_TYPE, VFIO_BASE + 20)


# --- enums and flags ---


class IoasMapFlags(enum.IntFlag):
    """``enum iommufd_ioas_map_flags``."""

    FIXED_IOVA = 1 << 0
    WRITEABLE = 1 << 1
    READABLE = 1 << 2


class HwptAllocFlags(enum.IntFlag):
    """``enum iommufd_hwpt_alloc_flags``."""

    NEST_PARENT = 1 << 0
    DIRTY_TRACKING = 1 << 1
    FAULT_ID_VALID = 1 << 2
    PASID = 1 << 3


class HwptDataType(enum.IntEnum):
    """``enum iommu_hwpt_data_type``."""

    NONE = 0
    VTD_S1 = 1
    ARM_SMMUV3 = 2
    AMD_GUEST = 3


class HwInfoType(enum.IntEnum):
    """``enum iommu_hw_info_type`` (``DEFAULT`` is an alias of ``NONE``)."""

    NONE = 0
    INTEL_VTD = 1
    ARM_SMMUV3 = 2
    TEGRA241_CMDQV = 3
    AMD = 4

    DEFAULT = 0


class HwInfoFlags(enum.IntFlag):
    """``enum iommufd_hw_info_flags``."""

    INPUT_TYPE = 1 << 0


class HwCapabilities(enum.IntFlag):
    """``enum iommufd_hw_capabilities``."""

    DIRTY_TRACKING = 1 << 0
    PCI_PASID_EXEC = 1 << 1
    PCI_PASID_PRIV = 1 << 2
    PCI_ATS_NOT_SUPPORTED = 1 << 3


class HwptInvalidateDataType(enum.IntEnum):
    """``enum iommu_hwpt_invalidate_data_type``."""

    VTD_S1 = 0
    ARM_SMMUV3 = 1


class ViommuType(enum.IntEnum):
    """``enum iommu_viommu_type``."""

    DEFAULT = 0
    ARM_SMMUV3 = 1
    TEGRA241_CMDQV = 2


class VeventqType(enum.IntEnum):
    """``enum iommu_veventq_type``."""

    DEFAULT = 0
    ARM_SMMUV3 = 1
    TEGRA241_CMDQV = 2


class VeventqFlag(enum.IntFlag):
    """``enum iommu_veventq_flag``: flags of a vEVENTQ record header."""

    LOST_EVENTS = 1 << 0


class VfioBindFlags(enum.IntFlag):
    """Flags of ``struct vfio_device_bind_iommufd``."""

    TOKEN = 1 << 0


class VfioAttachFlags(enum.IntFlag):
    """Flags of ``struct vfio_device_{attach,detach}_iommufd_pt``."""

    PASID = 1 << 0


ENUM_C_PREFIX: Final[dict[type[enum.IntEnum] | type[enum.IntFlag], str]] = {
    IommufdCmd: "IOMMUFD_CMD_",
    Ioctl: "",
    IoasMapFlags: "IOMMU_IOAS_MAP_",
    HwptAllocFlags: "IOMMU_HWPT_",
    HwptDataType: "IOMMU_HWPT_DATA_",
    HwInfoType: "IOMMU_HW_INFO_TYPE_",
    HwInfoFlags: "IOMMU_HW_INFO_FLAG_",
    HwCapabilities: "IOMMU_HW_CAP_",
    ViommuType: "IOMMU_VIOMMU_TYPE_",
    VeventqType: "IOMMU_VEVENTQ_TYPE_",
    VeventqFlag: "IOMMU_VEVENTQ_FLAG_",
    VfioBindFlags: "VFIO_DEVICE_BIND_FLAG_",
    VfioAttachFlags: "VFIO_DEVICE_ATTACH_",
}
"""C constant prefix of each enum: ``prefix + member.name`` is the C name."""

C_NAME_OVERRIDES: Final[dict[object, str]] = {
    # Members whose C names do not follow the class prefix.
    HwptAllocFlags.NEST_PARENT: "IOMMU_HWPT_ALLOC_NEST_PARENT",
    HwptAllocFlags.DIRTY_TRACKING: "IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
    HwptAllocFlags.PASID: "IOMMU_HWPT_ALLOC_PASID",
    HwptInvalidateDataType.VTD_S1: "IOMMU_HWPT_INVALIDATE_DATA_VTD_S1",
    HwptInvalidateDataType.ARM_SMMUV3: "IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3",
}


def c_name(member: enum.IntEnum | enum.IntFlag) -> str:
    """Return the C constant name of an enum member of this module."""
    override = C_NAME_OVERRIDES.get(member)
    if override is not None:
        return override
    return ENUM_C_PREFIX[type(member)] + str(member.name)


# --- structures ---

u8 = ctypes.c_uint8
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64


_S = TypeVar("_S", bound="UapiStruct")


class UapiStruct(ctypes.Structure):
    """Base of every uAPI structure: little helpers for bytes conversion."""

    C_NAME: str = ""

    def to_bytes(self) -> bytes:
        """Return the structure's bytes in native (little-endian) layout."""
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def sized(cls: type[_S]) -> _S:
        """Return a zeroed instance whose first u32 (size/argsz) is filled in."""
        inst = cls()
        ctypes.c_uint32.from_buffer(inst).value = ctypes.sizeof(cls)
        return inst


class IommuDestroy(UapiStruct):
    """``struct iommu_destroy``."""

    C_NAME = "iommu_destroy"
    _fields_ = [("size", u32), ("id", u32)]


class IommuIoasAlloc(UapiStruct):
    """``struct iommu_ioas_alloc``."""

    C_NAME = "iommu_ioas_alloc"
    _fields_ = [("size", u32), ("flags", u32), ("out_ioas_id", u32)]


class IommuIovaRange(UapiStruct):
    """``struct iommu_iova_range``: an inclusive interval of IOVA."""

    C_NAME = "iommu_iova_range"
    _fields_ = [("start", u64), ("last", u64)]


class IommuIoasIovaRanges(UapiStruct):
    """``struct iommu_ioas_iova_ranges``."""

    C_NAME = "iommu_ioas_iova_ranges"
    _fields_ = [
        ("size", u32),
        ("ioas_id", u32),
        ("num_iovas", u32),
        ("reserved", u32),
        ("allowed_iovas", u64),
        ("out_iova_alignment", u64),
    ]


class IommuIoasMap(UapiStruct):
    """``struct iommu_ioas_map``."""

    C_NAME = "iommu_ioas_map"
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("reserved", u32),
        ("user_va", u64),
        ("length", u64),
        ("iova", u64),
    ]


class IommuIoasUnmap(UapiStruct):
    """``struct iommu_ioas_unmap``."""

    C_NAME = "iommu_ioas_unmap"
    _fields_ = [("size", u32), ("ioas_id", u32), ("iova", u64), ("length", u64)]


class IommuHwptArmSmmuv3(UapiStruct):
    """``struct iommu_hwpt_arm_smmuv3``: the guest's vSTE (two le64 words)."""

    C_NAME = "iommu_hwpt_arm_smmuv3"
    _fields_ = [("ste", u64 * 2)]


class IommuHwptAlloc(UapiStruct):
    """``struct iommu_hwpt_alloc``."""

    C_NAME = "iommu_hwpt_alloc"
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("dev_id", u32),
        ("pt_id", u32),
        ("out_hwpt_id", u32),
        ("reserved", u32),
        ("data_type", u32),
        ("data_len", u32),
        ("data_uptr", u64),
        ("fault_id", u32),
        ("reserved2", u32),
    ]


HWPT_ALLOC_MIN_SIZE: Final = IommuHwptAlloc.reserved.offset + IommuHwptAlloc.reserved.size
"""offsetofend(iommu_hwpt_alloc, __reserved): the size of the first version."""


class IommuHwInfoArmSmmuv3(UapiStruct):
    """``struct iommu_hw_info_arm_smmuv3``: the physical SMMU's ID registers."""

    C_NAME = "iommu_hw_info_arm_smmuv3"
    _fields_ = [
        ("flags", u32),
        ("reserved", u32),
        ("idr", u32 * 6),
        ("iidr", u32),
        ("aidr", u32),
    ]


class IommuHwInfo(UapiStruct):
    """``struct iommu_hw_info`` (the in/out data-type union is ``out_data_type``)."""

    C_NAME = "iommu_hw_info"
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("dev_id", u32),
        ("data_len", u32),
        ("data_uptr", u64),
        ("out_data_type", u32),
        ("out_max_pasid_log2", u8),
        ("reserved", u8 * 3),
        ("out_capabilities", u64),
    ]


class IommuViommuArmSmmuv3Invalidate(UapiStruct):
    """``struct iommu_viommu_arm_smmuv3_invalidate``: one raw SMMUv3 command."""

    C_NAME = "iommu_viommu_arm_smmuv3_invalidate"
    _fields_ = [("cmd", u64 * 2)]


class IommuHwptInvalidate(UapiStruct):
    """``struct iommu_hwpt_invalidate``."""

    C_NAME = "iommu_hwpt_invalidate"
    _fields_ = [
        ("size", u32),
        ("hwpt_id", u32),
        ("data_uptr", u64),
        ("data_type", u32),
        ("entry_len", u32),
        ("entry_num", u32),
        ("reserved", u32),
    ]


class IommuViommuAlloc(UapiStruct):
    """``struct iommu_viommu_alloc``."""

    C_NAME = "iommu_viommu_alloc"
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("type", u32),
        ("dev_id", u32),
        ("hwpt_id", u32),
        ("out_viommu_id", u32),
        ("data_len", u32),
        ("reserved", u32),
        ("data_uptr", u64),
    ]


class IommuVdeviceAlloc(UapiStruct):
    """``struct iommu_vdevice_alloc``."""

    C_NAME = "iommu_vdevice_alloc"
    _fields_ = [
        ("size", u32),
        ("viommu_id", u32),
        ("dev_id", u32),
        ("out_vdevice_id", u32),
        ("virt_id", u64),
    ]


class IommufdVeventHeader(UapiStruct):
    """``struct iommufd_vevent_header``: precedes every vEVENTQ record."""

    C_NAME = "iommufd_vevent_header"
    _fields_ = [("flags", u32), ("sequence", u32)]


class IommuVeventArmSmmuv3(UapiStruct):
    """``struct iommu_vevent_arm_smmuv3``: one SMMUv3 event record (four le64)."""

    C_NAME = "iommu_vevent_arm_smmuv3"
    _fields_ = [("evt", u64 * 4)]


class IommuVeventqAlloc(UapiStruct):
    """``struct iommu_veventq_alloc``."""

    C_NAME = "iommu_veventq_alloc"
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("viommu_id", u32),
        ("type", u32),
        ("veventq_depth", u32),
        ("out_veventq_id", u32),
        ("out_veventq_fd", u32),
        ("reserved", u32),
    ]


class VfioDeviceBindIommufd(UapiStruct):
    """``struct vfio_device_bind_iommufd``."""

    C_NAME = "vfio_device_bind_iommufd"
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("iommufd", s32),
        ("out_devid", u32),
        ("token_uuid_ptr", u64),
    ]


class VfioDeviceAttachIommufdPt(UapiStruct):
    """``struct vfio_device_attach_iommufd_pt``."""

    C_NAME = "vfio_device_attach_iommufd_pt"
    _fields_ = [("argsz", u32), ("flags", u32), ("pt_id", u32), ("pasid", u32)]


class VfioDeviceDetachIommufdPt(UapiStruct):
    """``struct vfio_device_detach_iommufd_pt``."""

    C_NAME = "vfio_device_detach_iommufd_pt"
    _fields_ = [("argsz", u32), ("flags", u32), ("pasid", u32)]


ALL_STRUCTS: Final[tuple[type[UapiStruct], ...]] = (
    IommuDestroy,
    IommuIoasAlloc,
    IommuIovaRange,
    IommuIoasIovaRanges,
    IommuIoasMap,
    IommuIoasUnmap,
    IommuHwptArmSmmuv3,
    IommuHwptAlloc,
    IommuHwInfoArmSmmuv3,
    IommuHwInfo,
    IommuViommuArmSmmuv3Invalidate,
    IommuHwptInvalidate,
    IommuViommuAlloc,
    IommuVdeviceAlloc,
    IommufdVeventHeader,
    IommuVeventArmSmmuv3,
    IommuVeventqAlloc,
    VfioDeviceBindIommufd,
    VfioDeviceAttachIommufdPt,
    VfioDeviceDetachIommufdPt,
)
"""Every structure checked against the kernel headers."""

C_FIELD_NAMES: Final[dict[str, str]] = {"reserved": "__reserved", "reserved2": "__reserved2"}
"""Python field name → C member name where they differ."""

ALL_ENUMS: Final[tuple[type[enum.IntEnum] | type[enum.IntFlag], ...]] = (
    *ENUM_C_PREFIX.keys(),
    HwptInvalidateDataType,
)
"""Every enum checked against the kernel headers."""

# --- sizes and limits used by the backends ---

VEVENT_HEADER_SIZE: Final = ctypes.sizeof(IommufdVeventHeader)
VEVENT_ARM_SMMUV3_SIZE: Final = ctypes.sizeof(IommuVeventArmSmmuv3)
ARM_INVALIDATE_ENTRY_SIZE: Final = ctypes.sizeof(IommuViommuArmSmmuv3Invalidate)
ARM_INVALIDATE_ISSUE_BLOCK: Final = 63
"""arm_vsmmu_cache_invalidate issues the commands it has converted to the host's queue
every ``CMDQ_BATCH_ENTRIES - 1`` (BITS_PER_LONG - 1); when entry k is refused, those
since the last issued block are dropped, yet ``entry_num`` says k."""
VSTE_SIZE: Final = ctypes.sizeof(IommuHwptArmSmmuv3)
ATC_INV_SIZE_ALL: Final = 52
"""``ATC_INV_SIZE_ALL`` (arm-smmu-v3.h): an ATC_INV Size above it is refused (EIO)."""
HWPT_INVALIDATE_ENTRY_NUM_MAX: Final = 1 << 19
"""``IOMMU_HWPT_INVALIDATE_ENTRY_NUM_MAX`` (hw_pagetable.c): more entries are EINVAL."""
VSTE_WORD0_ALLOWED: Final = (STE.V.inplace_mask | STE.CONFIG.inplace_mask
                             | STE.S1FMT.inplace_mask | STE.S1CONTEXTPTR.inplace_mask
                             | STE.S1CDMAX.inplace_mask)
"""vSTE word 0 fields a guest may set (arm-smmu-v3.h STRTAB_STE_0_NESTING_ALLOWED)."""
VSTE_WORD1_ALLOWED: Final = (STE.S1DSS.inplace_mask | STE.S1CIR.inplace_mask
                             | STE.S1COR.inplace_mask | STE.S1CSH.inplace_mask
                             | STE.S1STALLD.inplace_mask | STE.EATS.inplace_mask)
"""vSTE word 1 fields a guest may set (arm-smmu-v3.h STRTAB_STE_1_NESTING_ALLOWED)."""
VEVENTQ_SEQUENCE_MASK: Final = 0x7FFF_FFFF
"""The vEVENTQ sequence counts modulo INT_MAX + 1 (it wraps to 0 after INT_MAX)."""
U64_MAX: Final = (1 << 64) - 1
ULONG_MAX: Final = U64_MAX
"""``virt_id`` indexes a kernel xarray: anything above ULONG_MAX is EINVAL (64-bit host)."""
IOMMU_NO_PASID: Final = 0


def offsetofend(struct: type[UapiStruct], member: str) -> int:
    """``offsetofend(struct, member)``: the first byte after ``member``."""
    descriptor = getattr(struct, member)
    return int(descriptor.offset + descriptor.size)


IOCTL_STRUCTS: Final[dict[Ioctl, tuple[type[UapiStruct], int]]] = {
    # iommufd_ioctl_ops[] in drivers/iommu/iommufd/main.c: the structure and its
    # min_size (offsetofend of the last member of the first version).
    Ioctl.IOMMU_DESTROY: (IommuDestroy, offsetofend(IommuDestroy, "id")),
    Ioctl.IOMMU_IOAS_ALLOC: (IommuIoasAlloc, offsetofend(IommuIoasAlloc, "out_ioas_id")),
    Ioctl.IOMMU_IOAS_IOVA_RANGES: (
        IommuIoasIovaRanges,
        offsetofend(IommuIoasIovaRanges, "out_iova_alignment"),
    ),
    Ioctl.IOMMU_IOAS_MAP: (IommuIoasMap, offsetofend(IommuIoasMap, "iova")),
    Ioctl.IOMMU_IOAS_UNMAP: (IommuIoasUnmap, offsetofend(IommuIoasUnmap, "length")),
    Ioctl.IOMMU_HWPT_ALLOC: (IommuHwptAlloc, HWPT_ALLOC_MIN_SIZE),
    Ioctl.IOMMU_GET_HW_INFO: (IommuHwInfo, offsetofend(IommuHwInfo, "reserved")),
    Ioctl.IOMMU_HWPT_INVALIDATE: (
        IommuHwptInvalidate,
        offsetofend(IommuHwptInvalidate, "reserved"),
    ),
    Ioctl.IOMMU_VIOMMU_ALLOC: (IommuViommuAlloc, offsetofend(IommuViommuAlloc, "out_viommu_id")),
    Ioctl.IOMMU_VDEVICE_ALLOC: (IommuVdeviceAlloc, offsetofend(IommuVdeviceAlloc, "virt_id")),
    Ioctl.IOMMU_VEVENTQ_ALLOC: (
        IommuVeventqAlloc,
        offsetofend(IommuVeventqAlloc, "out_veventq_fd"),
    ),
}
"""/dev/iommu ioctl → (its structure, the kernel's min_size for the leading ``size``)."""

# --- the arm-smmu-v3 driver's IOVA layout (arm-smmu-v3.c) ---

ARM_SMMU_MSI_IOVA_BASE: Final = 0x800_0000
"""MSI_IOVA_BASE: the IOMMU_RESV_SW_MSI window every device reserves in its IOAS."""
ARM_SMMU_MSI_IOVA_LENGTH: Final = 0x10_0000
"""MSI_IOVA_LENGTH."""
ARM_SMMU_S1_INPUT_BITS: Final = 48
"""A stage-1 domain's input size without FEAT_VAX (arm_smmu_domain_finalise)."""
QEMU_SMMU_IAS_BITS: Final = 44
"""A stage-2 domain's input size is the SMMU's IAS: 44 bits on QEMU's SMMUv3 (OAS 44)."""
