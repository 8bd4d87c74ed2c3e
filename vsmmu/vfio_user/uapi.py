"""Numbers of the external interfaces this package speaks: vfio-user, VFIO, PCI.

Everything numeric that comes from a specification lives here, named once:
the vfio-user message header and commands (QEMU ``docs/interop/vfio-user.rst``
and QEMU 11.1 ``hw/vfio-user/protocol.h``), the VFIO structures it reuses
(``linux/vfio.h``), and the PCI configuration-space layout (PCI Local Bus and
PCI Express base specifications).  The rest of the package uses these names.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from construct import Int16ul, Int32ul, Int64ul, Struct


class Layout:
    """A fixed-size message body declared with construct, read and written as tuples.

    The declaration (:attr:`declaration`) is the layout a reader sees once;
    :meth:`pack`/:meth:`unpack_from`/:attr:`size` take and give the fields in
    declaration order, as the handlers use them.  For control messages only:
    the register path (header, REGION_READ/WRITE) keeps :class:`struct.Struct`,
    which a compiled construct does not match in speed.
    """

    def __init__(self, declaration: Struct) -> None:
        self.declaration = declaration
        self.size: int = declaration.sizeof()
        self.fields: tuple[str, ...] = tuple(sub.name for sub in declaration.subcons)
        self.format: str = "<" + "".join(sub.subcon.fmtstr.lstrip("<>=").replace("L", "I")
                                         for sub in declaration.subcons)
        """The fields as :mod:`struct` format codes (for probes that generate values)."""

    def pack(self, *values: int) -> bytes:
        """The fields ``values`` (in declaration order) as bytes."""
        data: bytes = self.declaration.build(dict(zip(self.fields, values, strict=True)))
        return data

    def unpack_from(self, buffer: bytes | bytearray | memoryview, offset: int = 0
                    ) -> tuple[int, ...]:
        """The fields at ``offset`` of ``buffer`` (which holds at least :attr:`size` more)."""
        parsed = self.declaration.parse(bytes(buffer[offset:offset + self.size]))
        return tuple(parsed[name] for name in self.fields)


# --------------------------------------------------------------------------
# vfio-user message header and commands
# --------------------------------------------------------------------------

#: ``u16 id, u16 command, u32 size (header included), u32 flags, u32 error``.
HEADER: Final = struct.Struct("<HHIII")
HEADER_SIZE: Final = HEADER.size


class Command(enum.IntEnum):
    """vfio-user command numbers (``enum vfio_user_command``)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15


class MsgFlag(enum.IntFlag):
    """Bits of the header ``flags`` word."""

    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


#: The low nibble of ``flags`` is the message type: 0 request, 1 reply.
MSG_TYPE_MASK: Final = 0xF
MSG_TYPE_REQUEST: Final = 0x0
MSG_TYPE_REPLY: Final = 0x1
MSG_KNOWN_FLAGS: Final = MSG_TYPE_MASK | int(MsgFlag.NO_REPLY) | int(MsgFlag.ERROR)

VERSION_MAJOR: Final = 0
VERSION_MINOR: Final = 0
VERSION_BODY: Final = Layout(Struct("major" / Int16ul, "minor" / Int16ul))
"""VERSION: then a NUL-terminated JSON capabilities string."""

CAP_ROOT: Final = "capabilities"
CAP_MAX_FDS: Final = "max_msg_fds"
CAP_MAX_XFER: Final = "max_data_xfer_size"
CAP_PGSIZES: Final = "pgsizes"
CAP_MAX_DMA_MAPS: Final = "max_dma_maps"
CAP_WRITE_MULTIPLE: Final = "write_multiple"

#: Defaults of QEMU's client, and the values this server advertises.
DEFAULT_MAX_FDS: Final = 8
SERVER_MAX_FDS: Final = 16
DEFAULT_MAX_XFER: Final = 1024 * 1024
DEFAULT_PGSIZE: Final = 4096
DEFAULT_MAX_DMA_MAPS: Final = 65535
#: Room for the largest fixed part of any message on top of ``max_data_xfer_size``.
MAX_FIXED_PART: Final = 4096

DMA_MAP: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul, "offset" / Int64ul,
                               "address" / Int64ul, "size" / Int64ul))
"""DMA_MAP (``offset`` into the fd that comes with the message)."""
DMA_MAP_READ: Final = 0x1
DMA_MAP_WRITE: Final = 0x2
DMA_MAP_KNOWN_FLAGS: Final = DMA_MAP_READ | DMA_MAP_WRITE

DMA_UNMAP: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul, "address" / Int64ul,
                                 "size" / Int64ul))
DMA_UNMAP_GET_DIRTY_BITMAP: Final = 0x1
DMA_UNMAP_ALL: Final = 0x2
DMA_UNMAP_KNOWN_FLAGS: Final = DMA_UNMAP_GET_DIRTY_BITMAP | DMA_UNMAP_ALL

DEVICE_INFO: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul,
                                   "num_regions" / Int32ul, "num_irqs" / Int32ul))
"""DEVICE_GET_INFO."""
DEVICE_FLAGS_RESET: Final = 0x1
DEVICE_FLAGS_PCI: Final = 0x2

REGION_INFO: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul,
                                   "cap_offset" / Int32ul, "size" / Int64ul,
                                   "offset" / Int64ul))
"""DEVICE_GET_REGION_INFO (capabilities follow at ``cap_offset``)."""
REGION_INFO_FLAG_READ: Final = 0x1
REGION_INFO_FLAG_WRITE: Final = 0x2
REGION_INFO_FLAG_MMAP: Final = 0x4
REGION_INFO_FLAG_CAPS: Final = 0x8

IRQ_INFO: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul,
                                "count" / Int32ul))
"""DEVICE_GET_IRQ_INFO."""
IRQ_INFO_EVENTFD: Final = 0x1
IRQ_INFO_MASKABLE: Final = 0x2
IRQ_INFO_AUTOMASKED: Final = 0x4
IRQ_INFO_NORESIZE: Final = 0x8

IRQ_SET: Final = Layout(Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul,
                               "start" / Int32ul, "count" / Int32ul))
"""DEVICE_SET_IRQS (eventfds or bools follow)."""
IRQ_SET_DATA_NONE: Final = 0x1
IRQ_SET_DATA_BOOL: Final = 0x2
IRQ_SET_DATA_EVENTFD: Final = 0x4
IRQ_SET_DATA_TYPE_MASK: Final = 0x7
IRQ_SET_ACTION_MASK: Final = 0x8
IRQ_SET_ACTION_UNMASK: Final = 0x10
IRQ_SET_ACTION_TRIGGER: Final = 0x20
IRQ_SET_ACTION_TYPE_MASK: Final = 0x38

# REGION_READ / REGION_WRITE: u64 offset, u32 region, u32 count, data.
REGION_RW: Final = struct.Struct("<QII")

# REGION_WRITE_MULTI: u64 wr_cnt, then wr_cnt x (u64 offset, u32 region,
# u32 count, u8 data[8]).  QEMU only, not in the spec; always posted.
WRITE_MULTI_COUNT: Final = struct.Struct("<Q")
WRITE_MULTI_ONE: Final = struct.Struct("<QII8s")
WRITE_MULTI_DATA: Final = 8
WRITE_MULTI_MAX: Final = 200

# DMA_READ / DMA_WRITE (server -> client): u64 address, u64 count, data at
# byte 32 -- the layout of the spec (vfio-user.rst).  QEMU's source declares
# VFIOUserDMARW as u64 offset, u32 count, char data[] (data at 28), but the
# C struct is padded to 32 bytes, sizes are checked against sizeof() (a
# request under 32 bytes gets EINVAL), and the running QEMU 11.1.3 put the
# data of a DMA_READ reply at byte 32 (measured by
# tests/integration/test_vfio_user_qemu.py).  A u64 count below 2**32 reads
# the same as QEMU's u32 count followed by zero padding, so this layout
# serves both readings.  A DMA_READ reply repeats address and count before
# the data; a DMA_WRITE reply is a bare header.
DMA_RW: Final = struct.Struct("<QQ")

REQUEST_BODY: Final[dict[int, struct.Struct | Layout]] = {
    Command.VERSION: VERSION_BODY,
    Command.DMA_MAP: DMA_MAP,
    Command.DMA_UNMAP: DMA_UNMAP,
    Command.DEVICE_GET_INFO: DEVICE_INFO,
    Command.DEVICE_GET_REGION_INFO: REGION_INFO,
    Command.DEVICE_GET_IRQ_INFO: IRQ_INFO,
    Command.DEVICE_SET_IRQS: IRQ_SET,
    Command.REGION_READ: REGION_RW,
    Command.REGION_WRITE: REGION_RW,
    Command.REGION_WRITE_MULTI: WRITE_MULTI_COUNT,
    Command.DMA_READ: DMA_RW,
    Command.DEVICE_RESET: struct.Struct("<"),
}
"""The fixed part of each request's body (what follows the header), by command: what a
client lays out before any variable part (a client, the probes and the fuzz tests use it)."""


class PciRegion(enum.IntEnum):
    """VFIO PCI region indices."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_BARS: Final = 6
PCI_NUM_REGIONS: Final = 9


class PciIrq(enum.IntEnum):
    """VFIO PCI interrupt indices."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS: Final = 5

# --------------------------------------------------------------------------
# PCI configuration space
# --------------------------------------------------------------------------

PCI_CFG_SPACE_SIZE: Final = 256
PCI_CFG_SPACE_EXP_SIZE: Final = 4096

PCI_VENDOR_ID: Final = 0x00
PCI_DEVICE_ID: Final = 0x02
PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_REVISION_ID: Final = 0x08
PCI_CLASS_PROG: Final = 0x09
PCI_CACHE_LINE_SIZE: Final = 0x0C
PCI_LATENCY_TIMER: Final = 0x0D
PCI_HEADER_TYPE: Final = 0x0E
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_SUBSYSTEM_ID: Final = 0x2E
PCI_ROM_ADDRESS: Final = 0x30
PCI_CAPABILITY_LIST: Final = 0x34
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_INTERRUPT_PIN: Final = 0x3D
PCI_STD_HEADER_END: Final = 0x40

PCI_HEADER_TYPE_NORMAL: Final = 0x00
PCI_BAR_SIZE: Final = 4
PCI_COMMAND_IO: Final = 0x1
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4
PCI_COMMAND_PARITY: Final = 0x40
PCI_COMMAND_SERR: Final = 0x100
PCI_COMMAND_INTX_DISABLE: Final = 0x400
PCI_COMMAND_WRITABLE: Final = (
    PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE
)
PCI_STATUS_INTERRUPT: Final = 0x08
PCI_STATUS_CAP_LIST: Final = 0x10
#: Error bits of the status register: write 1 to clear.
PCI_STATUS_W1C: Final = 0xF900

PCI_BASE_ADDRESS_SPACE_IO: Final = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64: Final = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH: Final = 0x8
PCI_BASE_ADDRESS_MEM_FLAGS: Final = 0xF
PCI_MIN_MEM_BAR_SIZE: Final = 16

PCI_INTERRUPT_PIN_INTA: Final = 1

# Capability list (standard) and the PCI Express capability, version 2.
PCI_CAP_ID_MSIX: Final = 0x11
PCI_CAP_ID_EXP: Final = 0x10
PCI_CAP_LIST_NEXT: Final = 1
PCI_CAP_FIRST: Final = 0x40
PCI_EXP_FLAGS: Final = 2
PCI_EXP_FLAGS_VERSION_2: Final = 0x2
PCI_EXP_FLAGS_TYPE_SHIFT: Final = 4
PCI_EXP_TYPE_ENDPOINT: Final = 0x0
PCI_EXP_TYPE_RC_END: Final = 0x9
PCI_EXP_DEVCAP: Final = 4
PCI_EXP_DEVCTL: Final = 8
PCI_EXP_DEVCTL_WRITABLE: Final = 0x7FFF
PCI_EXP_LNKCAP: Final = 12
PCI_EXP_LNKSTA: Final = 18
PCI_EXP_CAP_V2_SIZE: Final = 0x3C
#: Link capabilities: 2.5 GT/s, x1; link status: the same, negotiated.
PCI_EXP_LNKCAP_X1_2G5: Final = 0x11
PCI_EXP_LNKSTA_X1_2G5: Final = 0x11

# MSI-X capability: u16 message control, u32 table offset|BIR, u32 PBA offset|BIR.
PCI_MSIX_FLAGS: Final = 2
PCI_MSIX_TABLE: Final = 4
PCI_MSIX_PBA: Final = 8
PCI_MSIX_CAP_SIZE: Final = 12
PCI_MSIX_FLAGS_ENABLE: Final = 0x8000
PCI_MSIX_FLAGS_MASKALL: Final = 0x4000
PCI_MSIX_ENTRY_SIZE: Final = 16
PCI_MSIX_BIR_MASK: Final = 0x7

#: Extended capabilities start here; a zero dword ends an empty list.
PCI_EXT_CAP_FIRST: Final = 0x100
PCI_EXT_CAP_HEADER: Final = 4
PCI_EXT_CAP_VER_SHIFT: Final = 16
PCI_EXT_CAP_NEXT_SHIFT: Final = 20
PCI_CAP_ID_VNDR: Final = 0x09
#: Address Translation Services extended capability (PCIe base spec §7.8.7).
PCI_EXT_CAP_ID_ATS: Final = 0x000F
PCI_EXT_CAP_ATS_SIZEOF: Final = 8
PCI_ATS_CAP: Final = 4
PCI_ATS_CTRL: Final = 6
PCI_ATS_CTRL_ENABLE: Final = 0x8000
PCI_ATS_CTRL_STU_MASK: Final = 0x1F
PCI_CAP_HEADER: Final = 2
