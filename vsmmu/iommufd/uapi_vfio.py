"""The VFIO device user API (``include/uapi/linux/vfio.h``) a passthrough endpoint needs.

The cdev-to-iommufd part of VFIO (BIND_IOMMUFD, ATTACH/DETACH_IOMMUFD_PT)
lives with iommufd in :mod:`vsmmu.iommufd.uapi`; this module holds the rest
of what a VMM does with a bound device: ask what it is (DEVICE_GET_INFO,
GET_REGION_INFO, GET_IRQ_INFO), wire its interrupts (SET_IRQS) and reset it.
Same conventions as :mod:`vsmmu.iommufd.uapi`: ctypes structures named as
in C (``C_NAME``), enums that print by name with :data:`ENUM_C_PREFIX`, and
every structure, offset and constant checked against the kernel headers by
``tests/unit/iommufd/test_iommufd_headers.py``.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

from vsmmu.iommufd.uapi import VFIO_BASE, VFIO_TYPE, UapiStruct, io, u8, u32, u64


class VfioIoctl(enum.IntEnum):
    """``VFIO_DEVICE_*`` requests on a device fd (``_IO(VFIO_TYPE, VFIO_BASE + n)``)."""

    VFIO_DEVICE_GET_INFO = io(VFIO_TYPE, VFIO_BASE + 7)
    VFIO_DEVICE_GET_REGION_INFO = io(VFIO_TYPE, VFIO_BASE + 8)
    VFIO_DEVICE_GET_IRQ_INFO = io(VFIO_TYPE, VFIO_BASE + 9)
    VFIO_DEVICE_SET_IRQS = io(VFIO_TYPE, VFIO_BASE + 10)
    VFIO_DEVICE_RESET = io(VFIO_TYPE, VFIO_BASE + 11)


class DeviceFlags(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*`` of ``struct vfio_device_info``."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionInfoFlags(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``: what a region allows."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionInfoCap(enum.IntEnum):
    """``VFIO_REGION_INFO_CAP_*``: ids of region-info capabilities."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4
    NVLINK2_LNKSPD = 5


class IrqInfoFlags(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``: how an interrupt index can be signalled and masked."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    """``VFIO_IRQ_SET_*``: one data type and one action per SET_IRQS."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_TYPE_MASK: Final = (
    IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
)
IRQ_SET_ACTION_TYPE_MASK: Final = (
    IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER
)


class PciRegionIndex(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``: the fixed regions of a vfio-pci device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    NUM_REGIONS = 9


class PciIrqIndex(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``: the interrupt indices of a vfio-pci device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
    NUM_IRQS = 5


ENUM_C_PREFIX: Final[dict[type[enum.IntEnum] | type[enum.IntFlag], str]] = {
    VfioIoctl: "",
    DeviceFlags: "VFIO_DEVICE_FLAGS_",
    RegionInfoFlags: "VFIO_REGION_INFO_FLAG_",
    RegionInfoCap: "VFIO_REGION_INFO_CAP_",
    IrqInfoFlags: "VFIO_IRQ_INFO_",
    IrqSetFlags: "VFIO_IRQ_SET_",
}
"""C constant prefix of each enum: ``prefix + member.name`` is the C name."""

C_NAME_SUFFIX: Final[dict[type[enum.IntEnum] | type[enum.IntFlag], tuple[str, str]]] = {
    PciRegionIndex: ("VFIO_PCI_", "_REGION_INDEX"),
    PciIrqIndex: ("VFIO_PCI_", "_IRQ_INDEX"),
}
"""Enums whose C names wrap the member name: ``prefix + name + suffix``."""

C_NAME_OVERRIDES: Final[dict[object, str]] = {
    PciRegionIndex.NUM_REGIONS: "VFIO_PCI_NUM_REGIONS",
    PciIrqIndex.NUM_IRQS: "VFIO_PCI_NUM_IRQS",
}
"""Members whose C names follow neither rule."""


def c_name(member: enum.IntEnum | enum.IntFlag) -> str:
    """Return the C constant name of an enum member of this module."""
    override = C_NAME_OVERRIDES.get(member)
    if override is not None:
        return override
    wrapped = C_NAME_SUFFIX.get(type(member))
    if wrapped is not None:
        return f"{wrapped[0]}{member.name}{wrapped[1]}"
    return ENUM_C_PREFIX[type(member)] + str(member.name)


# --- structures ---


class VfioDeviceInfo(UapiStruct):
    """``struct vfio_device_info``."""

    C_NAME = "vfio_device_info"
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("num_regions", u32),
        ("num_irqs", u32),
        ("cap_offset", u32),
        ("pad", u32),
    ]


class VfioRegionInfo(UapiStruct):
    """``struct vfio_region_info``; capabilities, if any, follow it (``cap_offset``)."""

    C_NAME = "vfio_region_info"
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("index", u32),
        ("cap_offset", u32),
        ("size", u64),
        ("offset", u64),
    ]


class VfioInfoCapHeader(UapiStruct):
    """``struct vfio_info_cap_header``: id, version, offset of the next (0: last)."""

    C_NAME = "vfio_info_cap_header"
    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", u32)]


class VfioRegionSparseMmapArea(UapiStruct):
    """``struct vfio_region_sparse_mmap_area``: one mmap-able window of a region."""

    C_NAME = "vfio_region_sparse_mmap_area"
    _fields_ = [("offset", u64), ("size", u64)]


class VfioRegionInfoCapSparseMmap(UapiStruct):
    """``struct vfio_region_info_cap_sparse_mmap`` (its areas follow it)."""

    C_NAME = "vfio_region_info_cap_sparse_mmap"
    _fields_ = [("header", VfioInfoCapHeader), ("nr_areas", u32), ("reserved", u32)]


class VfioIrqInfo(UapiStruct):
    """``struct vfio_irq_info``."""

    C_NAME = "vfio_irq_info"
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class VfioIrqSet(UapiStruct):
    """``struct vfio_irq_set`` without its ``data[]`` tail (eventfds or bools follow)."""

    C_NAME = "vfio_irq_set"
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("index", u32),
        ("start", u32),
        ("count", u32),
    ]


ALL_STRUCTS: Final[tuple[type[UapiStruct], ...]] = (
    VfioDeviceInfo,
    VfioRegionInfo,
    VfioInfoCapHeader,
    VfioRegionSparseMmapArea,
    VfioRegionInfoCapSparseMmap,
    VfioIrqInfo,
    VfioIrqSet,
)
"""Every structure checked against the kernel headers."""

C_FIELD_NAMES: Final[dict[str, str]] = {}
"""Python field name → C member name where they differ (none here: vfio.h has no ``__`` names)."""

ALL_ENUMS: Final[tuple[type[enum.IntEnum] | type[enum.IntFlag], ...]] = (
    *ENUM_C_PREFIX.keys(),
    *C_NAME_SUFFIX.keys(),
)
"""Every enum checked against the kernel headers."""

EVENTFD_NONE: Final = -1
"""An eventfd slot of DATA_EVENTFD that de-assigns the vector's trigger."""
EVENTFD_SLOT: Final = ctypes.c_int32
"""One entry of a DATA_EVENTFD array (``__s32``)."""
BOOL_SLOT: Final = u8
"""One entry of a DATA_BOOL array (``__u8``)."""
