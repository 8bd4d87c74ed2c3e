"""Context Descriptor (CD) and level-1 CD table descriptor.

Source: Arm IHI 0070 §5.4 "Context Descriptor" (64 bytes) and §5.3
"Level 1 Context Descriptor" (8 bytes).  The CD carries the stage-1
translation configuration: TCR-like fields in double word 0, TTB0/TTB1 in
double words 1 and 2, MAIR in double word 3.  Double words 4-7 (AMAIR,
IMPLEMENTATION DEFINED, PARTID/PMG, reserved) are carried raw.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

from vsmmu.arch.fields import Field, RecordLayout

logger = logging.getLogger(__name__)

CD_SIZE = 64
L1_CD_SIZE = 8

CD_L2_4K_INDEX_BITS = 6
"""S1Fmt=2-level 4K: a leaf CD table holds 2**6 = 64 CDs (IHI 0070 §5.2 S1Fmt)."""
CD_L2_64K_INDEX_BITS = 10
"""S1Fmt=2-level 64K: a leaf CD table holds 2**10 = 1024 CDs."""


class Tg0(enum.IntEnum):
    """CD.TG0: granule of the TTB0 tables (as TCR_EL1.TG0). 3 is reserved."""

    GRANULE_4K = 0
    GRANULE_64K = 1
    GRANULE_16K = 2


class Tg1(enum.IntEnum):
    """CD.TG1: granule of the TTB1 tables (as TCR_EL1.TG1). 0 is reserved."""

    GRANULE_16K = 1
    GRANULE_4K = 2
    GRANULE_64K = 3


TG0_PAGE_SHIFT: dict[int, int] = {Tg0.GRANULE_4K: 12, Tg0.GRANULE_64K: 16, Tg0.GRANULE_16K: 14}
"""CD.TG0 encoding -> granule page shift."""
TG1_PAGE_SHIFT: dict[int, int] = {Tg1.GRANULE_4K: 12, Tg1.GRANULE_64K: 16, Tg1.GRANULE_16K: 14}
"""CD.TG1 encoding -> granule page shift."""

CD_TXSZ_MIN = 16
"""Smallest T0SZ/T1SZ (48-bit VA) without IDR5.VAX (IHI 0070 §5.4 T0SZ)."""
CD_TXSZ_MAX = 39
"""Largest T0SZ/T1SZ without IDR3.STT (IHI 0070 §5.4 T0SZ)."""


class CD:
    """CD field table (IHI 0070 §5.4, "CD fields")."""

    T0SZ = Field("t0sz", 5, 0)
    TG0 = Field("tg0", 7, 6)
    IR0 = Field("ir0", 9, 8)
    OR0 = Field("or0", 11, 10)
    SH0 = Field("sh0", 13, 12)
    EPD0 = Field("epd0", 14, 14)
    ENDI = Field("endi", 15, 15)
    T1SZ = Field("t1sz", 21, 16)
    TG1 = Field("tg1", 23, 22)
    IR1 = Field("ir1", 25, 24)
    OR1 = Field("or1", 27, 26)
    SH1 = Field("sh1", 29, 28)
    EPD1 = Field("epd1", 30, 30)
    V = Field("v", 31, 31)
    IPS = Field("ips", 34, 32)
    AFFD = Field("affd", 35, 35)
    WXN = Field("wxn", 36, 36)
    UWXN = Field("uwxn", 37, 37)
    TBI = Field("tbi", 39, 38)
    PAN = Field("pan", 40, 40)
    AA64 = Field("aa64", 41, 41)
    HD = Field("hd", 42, 42)
    HA = Field("ha", 43, 43)
    S = Field("s", 44, 44)
    R = Field("r", 45, 45)
    A = Field("a", 46, 46)
    ASET = Field("aset", 47, 47)
    ASID = Field("asid", 63, 48)
    NSCFG0 = Field("nscfg0", 0, 0, word=1)
    HAD0 = Field("had0", 1, 1, word=1)
    TTB0 = Field("ttb0", 51, 4, word=1, address=True)
    NSCFG1 = Field("nscfg1", 0, 0, word=2)
    HAD1 = Field("had1", 1, 1, word=2)
    TTB1 = Field("ttb1", 51, 4, word=2, address=True)
    MAIR = Field("mair", 63, 0, word=3)
    AMAIR = Field("amair", 63, 0, word=4)
    IMPDEF = Field("impdef", 63, 0, word=5)
    DW6 = Field("dw6", 63, 0, word=6)
    DW7 = Field("dw7", 63, 0, word=7)

    LAYOUT = RecordLayout("CD", CD_SIZE, [
        T0SZ, TG0, IR0, OR0, SH0, EPD0, ENDI, T1SZ, TG1, IR1, OR1, SH1, EPD1, V, IPS, AFFD,
        WXN, UWXN, TBI, PAN, AA64, HD, HA, S, R, A, ASET, ASID, NSCFG0, HAD0, TTB0, NSCFG1,
        HAD1, TTB1, MAIR, AMAIR, IMPDEF, DW6, DW7,
    ])


@dataclasses.dataclass(frozen=True)
class Cd:
    """A decoded CD. Field names are :data:`CD.LAYOUT`'s; TTB0/TTB1 are in place."""

    t0sz: int = 0
    tg0: int = 0
    ir0: int = 0
    or0: int = 0
    sh0: int = 0
    epd0: int = 0
    endi: int = 0
    t1sz: int = 0
    tg1: int = 0
    ir1: int = 0
    or1: int = 0
    sh1: int = 0
    epd1: int = 0
    v: int = 0
    ips: int = 0
    affd: int = 0
    wxn: int = 0
    uwxn: int = 0
    tbi: int = 0
    pan: int = 0
    aa64: int = 0
    hd: int = 0
    ha: int = 0
    s: int = 0
    r: int = 0
    a: int = 0
    aset: int = 0
    asid: int = 0
    nscfg0: int = 0
    had0: int = 0
    ttb0: int = 0
    nscfg1: int = 0
    had1: int = 0
    ttb1: int = 0
    mair: int = 0
    amair: int = 0
    impdef: int = 0
    dw6: int = 0
    dw7: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Cd:
        """Decode 64 little-endian bytes. Raises ArchError if ``data`` is short."""
        return cls(**CD.LAYOUT.decode(data))

    def encode(self) -> bytes:
        """Encode to 64 little-endian bytes. Raises ArchError if a field does not fit."""
        return CD.LAYOUT.encode(dataclasses.asdict(self))

    def __str__(self) -> str:
        return (f"CD(V={self.v} AA64={self.aa64} ASID={self.asid:#x} T0SZ={self.t0sz} "
                f"TG0={self.tg0} EPD0={self.epd0} TTB0={self.ttb0:#x} T1SZ={self.t1sz} "
                f"TG1={self.tg1} EPD1={self.epd1} TTB1={self.ttb1:#x} IPS={self.ips})")


class L1CD:
    """Level-1 CD table descriptor fields (IHI 0070 §5.3)."""

    V = Field("v", 0, 0)
    L2PTR = Field("l2ptr", 51, 12, address=True)
    LAYOUT = RecordLayout("L1CD", L1_CD_SIZE, [V, L2PTR])


@dataclasses.dataclass(frozen=True)
class L1Cd:
    """A decoded level-1 CD table descriptor."""

    v: int = 0
    l2ptr: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> L1Cd:
        """Decode 8 little-endian bytes."""
        return cls(**L1CD.LAYOUT.decode(data))

    def encode(self) -> bytes:
        """Encode to 8 little-endian bytes."""
        return L1CD.LAYOUT.encode(dataclasses.asdict(self))


ASID8_LIMIT = 1 << 8
"""First ASID that needs IDR0.ASID16."""


def cd_split_index(ssid: int, leaf_bits: int) -> tuple[int, int]:
    """A SubstreamID's (level-1 index, leaf index) in a 2-level CD table (IHI 0070 §3.4)."""
    return ssid >> leaf_bits, ssid & ((1 << leaf_bits) - 1)
