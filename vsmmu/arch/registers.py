"""SMMUv3 register map: offsets, widths, fields and reset values.

Source: Arm IHI 0070 (SMMUv3 architecture specification), chapter 6
"Memory map and registers", sections 6.2 (register overview) and 6.3
(register descriptions).  The programming interface is two 64 KiB pages:
page 0 holds everything except the event/PRI queue producer and consumer
indices, which live on page 1 at ``0x10000 + offset``.

Registers are :class:`Reg` members (an ``IntEnum`` of byte offsets, so they
print by name); each register's fields are a namespace class of
:class:`~vsmmu.arch.fields.Field` objects named after the register.
"""

from __future__ import annotations

import enum
import logging

from vsmmu.arch.fields import Field

logger = logging.getLogger(__name__)

PAGE_SIZE = 0x10000
"""Size of one SMMU register page (64 KiB)."""
REGISTER_SPACE_SIZE = 2 * PAGE_SIZE
"""Page 0 and page 1: the 128 KiB the device model serves."""


class Reg(enum.IntEnum):
    """Byte offsets of the SMMUv3 Non-secure registers (IHI 0070 §6.2)."""

    IDR0 = 0x0000
    IDR1 = 0x0004
    IDR2 = 0x0008
    IDR3 = 0x000C
    IDR4 = 0x0010
    IDR5 = 0x0014
    IIDR = 0x0018
    AIDR = 0x001C
    CR0 = 0x0020
    CR0ACK = 0x0024
    CR1 = 0x0028
    CR2 = 0x002C
    STATUSR = 0x0040
    GBPA = 0x0044
    AGBPA = 0x0048
    IRQ_CTRL = 0x0050
    IRQ_CTRLACK = 0x0054
    GERROR = 0x0060
    GERRORN = 0x0064
    GERROR_IRQ_CFG0 = 0x0068
    GERROR_IRQ_CFG1 = 0x0070
    GERROR_IRQ_CFG2 = 0x0074
    STRTAB_BASE = 0x0080
    STRTAB_BASE_CFG = 0x0088
    CMDQ_BASE = 0x0090
    CMDQ_PROD = 0x0098
    CMDQ_CONS = 0x009C
    EVENTQ_BASE = 0x00A0
    EVENTQ_IRQ_CFG0 = 0x00B0
    EVENTQ_IRQ_CFG1 = 0x00B8
    EVENTQ_IRQ_CFG2 = 0x00BC
    PRIQ_BASE = 0x00C0
    PRIQ_IRQ_CFG0 = 0x00D0
    PRIQ_IRQ_CFG1 = 0x00D8
    PRIQ_IRQ_CFG2 = 0x00DC
    # Page 1 (IHI 0070 §6.2: "SMMU_EVENTQ_PROD ... offset 0x100A8").
    EVENTQ_PROD = 0x100A8
    EVENTQ_CONS = 0x100AC
    PRIQ_PROD = 0x100C8
    PRIQ_CONS = 0x100CC


REG64: frozenset[Reg] = frozenset({
    Reg.GERROR_IRQ_CFG0, Reg.STRTAB_BASE, Reg.CMDQ_BASE, Reg.EVENTQ_BASE,
    Reg.EVENTQ_IRQ_CFG0, Reg.PRIQ_BASE, Reg.PRIQ_IRQ_CFG0,
})
"""Registers that are 64 bits wide; every other :class:`Reg` is 32 bits."""


def reg_width(reg: Reg) -> int:
    """Return the width of ``reg`` in bytes (4 or 8)."""
    return 8 if reg in REG64 else 4


class IDR0:
    """SMMU_IDR0 fields (IHI 0070 §6.3.1)."""

    S2P = Field("S2P", 0, 0)
    S1P = Field("S1P", 1, 1)
    TTF = Field("TTF", 3, 2)
    COHACC = Field("COHACC", 4, 4)
    BTM = Field("BTM", 5, 5)
    HTTU = Field("HTTU", 7, 6)
    DORMHINT = Field("DORMHINT", 8, 8)
    HYP = Field("HYP", 9, 9)
    ATS = Field("ATS", 10, 10)
    NS1ATS = Field("NS1ATS", 11, 11)
    ASID16 = Field("ASID16", 12, 12)
    MSI = Field("MSI", 13, 13)
    SEV = Field("SEV", 14, 14)
    ATOS = Field("ATOS", 15, 15)
    PRI = Field("PRI", 16, 16)
    VMW = Field("VMW", 17, 17)
    VMID16 = Field("VMID16", 18, 18)
    CD2L = Field("CD2L", 19, 19)
    VATOS = Field("VATOS", 20, 20)
    TTENDIAN = Field("TTENDIAN", 22, 21)
    STALL_MODEL = Field("STALL_MODEL", 25, 24)
    TERM_MODEL = Field("TERM_MODEL", 26, 26)
    ST_LEVEL = Field("ST_LEVEL", 28, 27)


class Ttf(enum.IntEnum):
    """IDR0.TTF: translation table formats supported."""

    AARCH32 = 1
    AARCH64 = 2
    AARCH32_AND_AARCH64 = 3


class TtEndian(enum.IntEnum):
    """IDR0.TTENDIAN: translation table endianness supported."""

    MIXED = 0
    LE = 2
    BE = 3


class StallModel(enum.IntEnum):
    """IDR0.STALL_MODEL."""

    STALL_AND_TERMINATE = 0
    TERMINATE_ONLY = 1
    STALL_FORCED = 2


class StLevel(enum.IntEnum):
    """IDR0.ST_LEVEL: stream table formats supported."""

    LINEAR = 0
    TWO_LEVEL = 1


class IDR1:
    """SMMU_IDR1 fields (IHI 0070 §6.3.2)."""

    SIDSIZE = Field("SIDSIZE", 5, 0)
    SSIDSIZE = Field("SSIDSIZE", 10, 6)
    PRIQS = Field("PRIQS", 15, 11)
    EVENTQS = Field("EVENTQS", 20, 16)
    CMDQS = Field("CMDQS", 25, 21)
    ATTR_PERMS_OVR = Field("ATTR_PERMS_OVR", 26, 26)
    ATTR_TYPES_OVR = Field("ATTR_TYPES_OVR", 27, 27)
    REL = Field("REL", 28, 28)
    QUEUES_PRESET = Field("QUEUES_PRESET", 29, 29)
    TABLES_PRESET = Field("TABLES_PRESET", 30, 30)
    ECMDQ = Field("ECMDQ", 31, 31)


class IDR3:
    """SMMU_IDR3 fields (IHI 0070 §6.3.4)."""

    HAD = Field("HAD", 2, 2)
    PBHA = Field("PBHA", 3, 3)
    XNX = Field("XNX", 4, 4)
    PPS = Field("PPS", 5, 5)
    MPAM = Field("MPAM", 7, 7)
    FWB = Field("FWB", 8, 8)
    STT = Field("STT", 9, 9)
    RIL = Field("RIL", 10, 10)
    BBML = Field("BBML", 12, 11)


class IDR5:
    """SMMU_IDR5 fields (IHI 0070 §6.3.6)."""

    OAS = Field("OAS", 2, 0)
    GRAN4K = Field("GRAN4K", 4, 4)
    GRAN16K = Field("GRAN16K", 5, 5)
    GRAN64K = Field("GRAN64K", 6, 6)
    VAX = Field("VAX", 11, 10)
    STALL_MAX = Field("STALL_MAX", 31, 16)


class Oas(enum.IntEnum):
    """IDR5.OAS (and CD.IPS) encodings of an address size."""

    BITS_32 = 0
    BITS_36 = 1
    BITS_40 = 2
    BITS_42 = 3
    BITS_44 = 4
    BITS_48 = 5
    BITS_52 = 6

    @property
    def bits(self) -> int:
        """The address size in bits."""
        return OAS_BITS[self]


OAS_BITS: dict[int, int] = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52}
"""IHI 0070 §6.3.6 IDR5.OAS: encoding -> output address size in bits."""


class AIDR:
    """SMMU_AIDR fields (IHI 0070 §6.3.8)."""

    ARCH_MINOR_REV = Field("ArchMinorRev", 3, 0)
    ARCH_MAJOR_REV = Field("ArchMajorRev", 7, 4)


class CR0:
    """SMMU_CR0 and SMMU_CR0ACK fields (IHI 0070 §6.3.9, §6.3.10)."""

    SMMUEN = Field("SMMUEN", 0, 0)
    PRIQEN = Field("PRIQEN", 1, 1)
    EVENTQEN = Field("EVENTQEN", 2, 2)
    CMDQEN = Field("CMDQEN", 3, 3)
    ATSCHK = Field("ATSCHK", 4, 4)
    VMW = Field("VMW", 8, 6)
    WRITABLE = 0x1DF
    """Bits of CR0 that are not RES0 (SMMUEN..ATSCHK, VMW)."""


class CR1:
    """SMMU_CR1 fields (IHI 0070 §6.3.11): queue and table memory attributes."""

    QUEUE_IC = Field("QUEUE_IC", 1, 0)
    QUEUE_OC = Field("QUEUE_OC", 3, 2)
    QUEUE_SH = Field("QUEUE_SH", 5, 4)
    TABLE_IC = Field("TABLE_IC", 7, 6)
    TABLE_OC = Field("TABLE_OC", 9, 8)
    TABLE_SH = Field("TABLE_SH", 11, 10)
    WRITABLE = 0xFFF
    """Bits of CR1 that are not RES0."""


class CR2:
    """SMMU_CR2 fields (IHI 0070 §6.3.12)."""

    E2H = Field("E2H", 0, 0)
    RECINVSID = Field("RECINVSID", 1, 1)
    PTM = Field("PTM", 2, 2)
    WRITABLE = 0x7
    """Bits of CR2 that are not RES0."""


class STATUSR:
    """SMMU_STATUSR fields (IHI 0070 §6.3.13)."""

    DORMANT = Field("DORMANT", 0, 0)


class GBPA:
    """SMMU_GBPA fields (IHI 0070 §6.3.14): global bypass attributes."""

    MEMATTR = Field("MemAttr", 3, 0)
    MTCFG = Field("MTCFG", 4, 4)
    ALLOCCFG = Field("ALLOCCFG", 11, 8)
    SHCFG = Field("SHCFG", 13, 12)
    PRIVCFG = Field("PRIVCFG", 17, 16)
    INSTCFG = Field("INSTCFG", 19, 18)
    ABORT = Field("ABORT", 20, 20)
    UPDATE = Field("UPDATE", 31, 31)
    WRITABLE = 0x001F3F1F
    """Attribute bits of GBPA (everything but UPDATE and RES0)."""


class SHCFG(enum.IntEnum):
    """Shareability override encodings (GBPA.SHCFG, STE.SHCFG)."""

    NON_SHAREABLE = 0
    USE_INCOMING = 1
    OUTER_SHAREABLE = 2
    INNER_SHAREABLE = 3


class IRQ_CTRL:
    """SMMU_IRQ_CTRL and SMMU_IRQ_CTRLACK fields (IHI 0070 §6.3.16)."""

    GERROR_IRQEN = Field("GERROR_IRQEN", 0, 0)
    PRIQ_IRQEN = Field("PRIQ_IRQEN", 1, 1)
    EVENTQ_IRQEN = Field("EVENTQ_IRQEN", 2, 2)
    WRITABLE = 0x7


class GERROR:
    """SMMU_GERROR and SMMU_GERRORN fields (IHI 0070 §6.3.18, §6.3.19).

    An error is *active* while its GERROR bit differs from its GERRORN bit:
    the SMMU toggles GERROR to raise, software toggles GERRORN to acknowledge.
    """

    CMDQ_ERR = Field("CMDQ_ERR", 0, 0)
    EVENTQ_ABT_ERR = Field("EVENTQ_ABT_ERR", 2, 2)
    PRIQ_ABT_ERR = Field("PRIQ_ABT_ERR", 3, 3)
    MSI_CMDQ_ABT_ERR = Field("MSI_CMDQ_ABT_ERR", 4, 4)
    MSI_EVENTQ_ABT_ERR = Field("MSI_EVENTQ_ABT_ERR", 5, 5)
    MSI_PRIQ_ABT_ERR = Field("MSI_PRIQ_ABT_ERR", 6, 6)
    MSI_GERROR_ABT_ERR = Field("MSI_GERROR_ABT_ERR", 7, 7)
    SFM_ERR = Field("SFM_ERR", 8, 8)
    CMDQP_ERR = Field("CMDQP_ERR", 9, 9)
    WRITABLE = 0x3FD
    """The error bits (all named fields)."""


class IRQ_CFG0:
    """SMMU_{GERROR,EVENTQ,PRIQ}_IRQ_CFG0: MSI target address (IHI 0070 §6.3.20)."""

    ADDR = Field("ADDR", 51, 2, address=True)


class IRQ_CFG2:
    """SMMU_{GERROR,EVENTQ,PRIQ}_IRQ_CFG2: MSI attributes."""

    MEMATTR = Field("MemAttr", 3, 0)
    SH = Field("SH", 5, 4)
    WRITABLE = MEMATTR.inplace_mask | SH.inplace_mask


class STRTAB_BASE:
    """SMMU_STRTAB_BASE fields (IHI 0070 §6.3.23)."""

    ADDR = Field("ADDR", 51, 6, address=True)
    RA = Field("RA", 62, 62)
    WRITABLE = ADDR.inplace_mask | RA.inplace_mask


class STRTAB_BASE_CFG:
    """SMMU_STRTAB_BASE_CFG fields (IHI 0070 §6.3.24)."""

    LOG2SIZE = Field("LOG2SIZE", 5, 0)
    SPLIT = Field("SPLIT", 10, 6)
    FMT = Field("FMT", 17, 16)
    WRITABLE = 0x307FF


class StrtabFmt(enum.IntEnum):
    """STRTAB_BASE_CFG.FMT."""

    LINEAR = 0
    TWO_LEVEL = 1


STRTAB_SPLIT_VALUES = (6, 8, 10)
"""STRTAB_BASE_CFG.SPLIT values the architecture defines (4K, 16K, 64K level-2 tables)."""


class QUEUE_BASE:
    """SMMU_CMDQ_BASE / SMMU_EVENTQ_BASE / SMMU_PRIQ_BASE fields (IHI 0070 §6.3.25, §6.3.28).

    Bit 62 is RA for the command queue and WA for the event and PRI queues.
    """

    LOG2SIZE = Field("LOG2SIZE", 4, 0)
    ADDR = Field("ADDR", 51, 5, address=True)
    RA_WA = Field("RA", 62, 62)
    WRITABLE = LOG2SIZE.inplace_mask | ADDR.inplace_mask | RA_WA.inplace_mask


class CMDQ_CONS:
    """SMMU_CMDQ_CONS fields beyond the queue index (IHI 0070 §6.3.27)."""

    ERR = Field("ERR", 30, 24)


class EVENTQ_PROD:
    """SMMU_EVENTQ_PROD fields beyond the queue index (IHI 0070 §6.3.30)."""

    OVFLG = Field("OVFLG", 31, 31)


class EVENTQ_CONS:
    """SMMU_EVENTQ_CONS fields beyond the queue index (IHI 0070 §6.3.31)."""

    OVACKFLG = Field("OVACKFLG", 31, 31)


class QueueIndex:
    """Queue PROD/CONS index arithmetic for a queue of ``2**log2size`` entries.

    A pointer is ``WR:RD`` — the entry index in bits ``[log2size-1:0]`` and the
    wrap bit at ``log2size`` (IHI 0070 §3.5.1 "Queue entry and index").
    """

    __slots__ = ("index_mask", "log2size", "pointer_mask", "size", "wrap_bit")

    def __init__(self, log2size: int) -> None:
        self.log2size = log2size
        self.size = 1 << log2size
        self.index_mask = self.size - 1
        self.wrap_bit = self.size
        self.pointer_mask = (self.size << 1) - 1

    def index(self, pointer: int) -> int:
        """The entry index of ``pointer``."""
        return pointer & self.index_mask

    def wrap(self, pointer: int) -> int:
        """The wrap bit of ``pointer`` (0 or 1)."""
        return (pointer >> self.log2size) & 1

    def pointer(self, value: int) -> int:
        """The ``WR:RD`` part of a PROD/CONS register value (other bits dropped)."""
        return value & self.pointer_mask

    def increment(self, pointer: int, count: int = 1) -> int:
        """``pointer`` advanced by ``count`` entries, wrapping and toggling the wrap bit."""
        return (pointer + count) & self.pointer_mask

    def used(self, prod: int, cons: int) -> int:
        """Entries between ``cons`` and ``prod`` (0 when empty, ``size`` when full)."""
        return (prod - cons) & self.pointer_mask

    def is_full(self, prod: int, cons: int) -> bool:
        """Whether the queue holds ``size`` entries (same index, different wrap)."""
        return (prod ^ cons) & self.pointer_mask == self.wrap_bit

    def is_empty(self, prod: int, cons: int) -> bool:
        """Whether the queue holds no entry (same index and wrap)."""
        return (prod ^ cons) & self.pointer_mask == 0


RESET_VALUES: dict[Reg, int] = {reg: 0 for reg in Reg}
"""Architectural reset values of the writable registers.

Everything resets to zero except GBPA, whose reset value is IMPLEMENTATION
DEFINED (IHI 0070 §6.3.14); like QEMU's SMMUv3 we reset SHCFG to "use
incoming" and leave ABORT clear, so an SMMU that is not enabled bypasses.
"""
RESET_VALUES[Reg.GBPA] = GBPA.SHCFG.place(SHCFG.USE_INCOMING)
