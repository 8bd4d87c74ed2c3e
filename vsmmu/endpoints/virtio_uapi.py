"""Virtio 1.x numbers: PCI identity, PCI capabilities, common configuration, rings.

Values and layouts are those of the OASIS Virtual I/O Device (VIRTIO)
Version 1.2 specification (§2 basic facilities, §4.1 virtio over PCI, §5.4
entropy device) and Linux's ``include/uapi/linux/virtio_*.h``.  Nothing else
in :mod:`vsmmu.endpoints` writes these numbers.
"""

from __future__ import annotations

import enum
from typing import Final

# -- PCI identity (§4.1.2) -----------------------------------------------------

VIRTIO_PCI_VENDOR_ID: Final = 0x1AF4
#: Non-transitional (modern only) devices use 0x1040 + the virtio device id.
VIRTIO_PCI_MODERN_DEVICE_BASE: Final = 0x1040
#: Non-transitional devices have revision >= 1.
VIRTIO_PCI_MODERN_REVISION: Final = 1
#: PCI class "other" (class 0xff, subclass 0, prog-if 0), as QEMU's virtio-rng-pci.
PCI_CLASS_OTHERS: Final = 0xFF0000
#: PCI class "mass storage, SCSI" (0x01, 0x00), as QEMU's virtio-blk-pci.
PCI_CLASS_STORAGE_SCSI: Final = 0x010000


class VirtioDeviceId(enum.IntEnum):
    """Virtio device ids (§5)."""

    BLOCK = 2
    ENTROPY = 4


# -- PCI vendor-specific capabilities (§4.1.4) ----------------------------------


class VirtioPciCapType(enum.IntEnum):
    """``cfg_type`` of a ``virtio_pci_cap``."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5


#: ``struct virtio_pci_cap`` byte offsets and size.
VIRTIO_PCI_CAP_LEN: Final = 2
VIRTIO_PCI_CAP_CFG_TYPE: Final = 3
VIRTIO_PCI_CAP_BAR: Final = 4
VIRTIO_PCI_CAP_ID: Final = 5
VIRTIO_PCI_CAP_OFFSET: Final = 8
VIRTIO_PCI_CAP_LENGTH: Final = 12
VIRTIO_PCI_CAP_SIZEOF: Final = 16
#: ``struct virtio_pci_notify_cap``: the cap, then ``notify_off_multiplier``.
VIRTIO_PCI_NOTIFY_CAP_MULT: Final = 16
VIRTIO_PCI_NOTIFY_CAP_SIZEOF: Final = 20


class CommonCfg(enum.IntEnum):
    """``struct virtio_pci_common_cfg`` register offsets (§4.1.4.3)."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC_LO = 0x20
    QUEUE_DESC_HI = 0x24
    QUEUE_DRIVER_LO = 0x28
    QUEUE_DRIVER_HI = 0x2C
    QUEUE_DEVICE_LO = 0x30
    QUEUE_DEVICE_HI = 0x34


#: Width in bytes of each common-config register.
COMMON_CFG_WIDTH: Final[dict[CommonCfg, int]] = {
    CommonCfg.DEVICE_FEATURE_SELECT: 4,
    CommonCfg.DEVICE_FEATURE: 4,
    CommonCfg.DRIVER_FEATURE_SELECT: 4,
    CommonCfg.DRIVER_FEATURE: 4,
    CommonCfg.CONFIG_MSIX_VECTOR: 2,
    CommonCfg.NUM_QUEUES: 2,
    CommonCfg.DEVICE_STATUS: 1,
    CommonCfg.CONFIG_GENERATION: 1,
    CommonCfg.QUEUE_SELECT: 2,
    CommonCfg.QUEUE_SIZE: 2,
    CommonCfg.QUEUE_MSIX_VECTOR: 2,
    CommonCfg.QUEUE_ENABLE: 2,
    CommonCfg.QUEUE_NOTIFY_OFF: 2,
    CommonCfg.QUEUE_DESC_LO: 4,
    CommonCfg.QUEUE_DESC_HI: 4,
    CommonCfg.QUEUE_DRIVER_LO: 4,
    CommonCfg.QUEUE_DRIVER_HI: 4,
    CommonCfg.QUEUE_DEVICE_LO: 4,
    CommonCfg.QUEUE_DEVICE_HI: 4,
}
#: ``sizeof(struct virtio_pci_common_cfg)`` (without the 1.2 notify-data/reset tail).
VIRTIO_PCI_COMMON_CFG_SIZE: Final = 0x38
#: "No MSI-X vector" (what the vector registers read without MSI-X).
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF
#: Feature bits come in 32-bit windows chosen by the select registers.
FEATURE_WINDOW_BITS: Final = 32


class DeviceStatus(enum.IntFlag):
    """``device_status`` bits (§2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class IsrStatus(enum.IntFlag):
    """ISR status bits (§4.1.4.5)."""

    QUEUE = 1
    CONFIG = 2


class VirtioFeature(enum.IntEnum):
    """Transport feature bit numbers (§6)."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33


# -- split virtqueues (§2.7) ------------------------------------------------------

#: ``struct virtq_desc``: le64 addr, le32 len, le16 flags, le16 next.
VIRTQ_DESC_SIZE: Final = 16
VIRTQ_DESC_ADDR: Final = 0
VIRTQ_DESC_LEN: Final = 8
VIRTQ_DESC_FLAGS: Final = 12
VIRTQ_DESC_NEXT: Final = 14
#: ``struct virtq_avail``: le16 flags, le16 idx, le16 ring[size].
VIRTQ_AVAIL_FLAGS: Final = 0
VIRTQ_AVAIL_IDX: Final = 2
VIRTQ_AVAIL_RING: Final = 4
VIRTQ_AVAIL_ELEM_SIZE: Final = 2
#: ``struct virtq_used``: le16 flags, le16 idx, {le32 id, le32 len} ring[size].
VIRTQ_USED_FLAGS: Final = 0
VIRTQ_USED_IDX: Final = 2
VIRTQ_USED_RING: Final = 4
VIRTQ_USED_ELEM_SIZE: Final = 8
#: Ring indices are free-running 16-bit counters.
VIRTQ_IDX_MODULUS: Final = 1 << 16
#: Alignment the driver must give each part (§2.7, table "Virtqueue Part Alignment").
VIRTQ_DESC_ALIGN: Final = 16
VIRTQ_AVAIL_ALIGN: Final = 2
VIRTQ_USED_ALIGN: Final = 4
#: Guest addresses are 64-bit.
VIRTQ_ADDRESS_LIMIT: Final = 1 << 64


class DescFlag(enum.IntFlag):
    """``virtq_desc.flags``."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlag(enum.IntFlag):
    """``virtq_avail.flags``."""

    NO_INTERRUPT = 1


# -- block device (§5.2) ------------------------------------------------------------


class BlkFeature(enum.IntEnum):
    """virtio-blk device feature bit numbers (§5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9


class BlkRequestType(enum.IntEnum):
    """``virtio_blk_outhdr.type`` (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


class BlkStatus(enum.IntEnum):
    """The status byte a request ends with (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: Sectors are 512 bytes whatever ``blk_size`` says (§5.2.6).
VIRTIO_BLK_SECTOR_SIZE: Final = 512
#: ``struct virtio_blk_outhdr``: le32 type, le32 reserved, le64 sector.
VIRTIO_BLK_OUTHDR_FORMAT: Final = "<IIQ"
VIRTIO_BLK_OUTHDR_SIZE: Final = 16
#: A GET_ID answer is at most 20 bytes, NUL-padded (no terminator when it is exactly 20).
VIRTIO_BLK_ID_BYTES: Final = 20
#: ``struct virtio_blk_config`` up to ``blk_size``: le64 capacity, le32 size_max,
#: le32 seg_max, geometry (le16 cylinders, u8 heads, u8 sectors), le32 blk_size.
VIRTIO_BLK_CONFIG_FORMAT: Final = "<QIIHBBI"
