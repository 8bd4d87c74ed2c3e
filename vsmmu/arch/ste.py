"""Stream Table Entry (STE) and level-1 stream table descriptor.

Source: Arm IHI 0070 §5.2 "Stream Table Entry" (64 bytes, eight 64-bit
double words) and §5.1 "Level 1 Stream Table Descriptor" (8 bytes).
Double words 4-7 (VMS pointer, Secure fields, ...) are carried raw as
``dw4``..``dw7`` so a decode/encode round trip keeps every bit.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import struct

from vsmmu.arch.fields import DWORD_MASK, ArchError, Field, RecordLayout

logger = logging.getLogger(__name__)

STE_SIZE = 64
L1_STD_SIZE = 8
_STE_DWORDS = struct.Struct("<8Q")
_L1_STD_DWORD = struct.Struct("<Q")


class SteConfig(enum.IntEnum):
    """STE.Config (IHI 0070 §5.2): what the stream does. 1-3 are reserved."""

    ABORT = 0b000
    BYPASS = 0b100
    S1_TRANS = 0b101
    S2_TRANS = 0b110
    NESTED = 0b111


class S1Fmt(enum.IntEnum):
    """STE.S1Fmt: format of the Context Descriptor table."""

    LINEAR = 0
    TWO_LEVEL_4K = 1
    TWO_LEVEL_64K = 2


class S1Dss(enum.IntEnum):
    """STE.S1DSS: behaviour of transactions without a SubstreamID."""

    TERMINATE = 0
    BYPASS = 1
    SSID0 = 2


class Eats(enum.IntEnum):
    """STE.EATS: ATS translation requests allowed. 3 is reserved."""

    ABORT = 0
    FULL = 1
    SPLIT = 2


class Strw(enum.IntEnum):
    """STE.STRW: StreamWorld (translation regime). 1 is reserved."""

    NSEL1 = 0
    EL2 = 2
    EL2_E2H = 3


class STE:
    """STE field table (IHI 0070 §5.2, "STE fields")."""

    V = Field("v", 0, 0)
    CONFIG = Field("config", 3, 1)
    S1FMT = Field("s1fmt", 5, 4)
    S1CONTEXTPTR = Field("s1_context_ptr", 51, 6, address=True)
    S1CDMAX = Field("s1cdmax", 63, 59)
    S1DSS = Field("s1dss", 1, 0, word=1)
    S1CIR = Field("s1cir", 3, 2, word=1)
    S1COR = Field("s1cor", 5, 4, word=1)
    S1CSH = Field("s1csh", 7, 6, word=1)
    S2HWU = Field("s2hwu", 11, 8, word=1)
    DRE = Field("dre", 12, 12, word=1)
    CONT = Field("cont", 16, 13, word=1)
    DCP = Field("dcp", 17, 17, word=1)
    PPAR = Field("ppar", 18, 18, word=1)
    MEV = Field("mev", 19, 19, word=1)
    S1STALLD = Field("s1stalld", 27, 27, word=1)
    EATS = Field("eats", 29, 28, word=1)
    STRW = Field("strw", 31, 30, word=1)
    MEMATTR = Field("memattr", 35, 32, word=1)
    MTCFG = Field("mtcfg", 36, 36, word=1)
    ALLOCCFG = Field("alloccfg", 40, 37, word=1)
    SHCFG = Field("shcfg", 45, 44, word=1)
    NSCFG = Field("nscfg", 47, 46, word=1)
    PRIVCFG = Field("privcfg", 49, 48, word=1)
    INSTCFG = Field("instcfg", 51, 50, word=1)
    S2VMID = Field("s2vmid", 15, 0, word=2)
    S2T0SZ = Field("s2t0sz", 37, 32, word=2)
    S2SL0 = Field("s2sl0", 39, 38, word=2)
    S2IR0 = Field("s2ir0", 41, 40, word=2)
    S2OR0 = Field("s2or0", 43, 42, word=2)
    S2SH0 = Field("s2sh0", 45, 44, word=2)
    S2TG = Field("s2tg", 47, 46, word=2)
    S2PS = Field("s2ps", 50, 48, word=2)
    S2AA64 = Field("s2aa64", 51, 51, word=2)
    S2ENDI = Field("s2endi", 52, 52, word=2)
    S2AFFD = Field("s2affd", 53, 53, word=2)
    S2PTW = Field("s2ptw", 54, 54, word=2)
    S2HD = Field("s2hd", 55, 55, word=2)
    S2HA = Field("s2ha", 56, 56, word=2)
    S2S = Field("s2s", 57, 57, word=2)
    S2R = Field("s2r", 58, 58, word=2)
    S2TTB = Field("s2ttb", 51, 4, word=3, address=True)
    DW4 = Field("dw4", 63, 0, word=4)
    DW5 = Field("dw5", 63, 0, word=5)
    DW6 = Field("dw6", 63, 0, word=6)
    DW7 = Field("dw7", 63, 0, word=7)

    LAYOUT = RecordLayout("STE", STE_SIZE, [
        V, CONFIG, S1FMT, S1CONTEXTPTR, S1CDMAX, S1DSS, S1CIR, S1COR, S1CSH, S2HWU, DRE,
        CONT, DCP, PPAR, MEV, S1STALLD, EATS, STRW, MEMATTR, MTCFG, ALLOCCFG,
        SHCFG, NSCFG, PRIVCFG, INSTCFG, S2VMID, S2T0SZ, S2SL0, S2IR0, S2OR0, S2SH0, S2TG,
        S2PS, S2AA64, S2ENDI, S2AFFD, S2PTW, S2HD, S2HA, S2S, S2R, S2TTB, DW4, DW5, DW6, DW7,
    ])


@dataclasses.dataclass(frozen=True)
class Ste:
    """A decoded STE. Field names are :data:`STE.LAYOUT`'s; addresses are in place."""

    v: int = 0
    config: int = 0
    s1fmt: int = 0
    s1_context_ptr: int = 0
    s1cdmax: int = 0
    s1dss: int = 0
    s1cir: int = 0
    s1cor: int = 0
    s1csh: int = 0
    s2hwu: int = 0
    dre: int = 0
    cont: int = 0
    dcp: int = 0
    ppar: int = 0
    mev: int = 0
    s1stalld: int = 0
    eats: int = 0
    strw: int = 0
    memattr: int = 0
    mtcfg: int = 0
    alloccfg: int = 0
    shcfg: int = 0
    nscfg: int = 0
    privcfg: int = 0
    instcfg: int = 0
    s2vmid: int = 0
    s2t0sz: int = 0
    s2sl0: int = 0
    s2ir0: int = 0
    s2or0: int = 0
    s2sh0: int = 0
    s2tg: int = 0
    s2ps: int = 0
    s2aa64: int = 0
    s2endi: int = 0
    s2affd: int = 0
    s2ptw: int = 0
    s2hd: int = 0
    s2ha: int = 0
    s2s: int = 0
    s2r: int = 0
    s2ttb: int = 0
    dw4: int = 0
    dw5: int = 0
    dw6: int = 0
    dw7: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Ste:
        """Decode 64 little-endian bytes. Raises ArchError if ``data`` is short."""
        return cls(**STE.LAYOUT.decode(data))

    @classmethod
    def from_words(cls, words: tuple[int, ...]) -> Ste:
        """Decode the eight double words :func:`ste_words` returns (same result as decode)."""
        return cls(**STE.LAYOUT.decode_words(words))

    def encode(self) -> bytes:
        """Encode to 64 little-endian bytes. Raises ArchError if a field does not fit."""
        return STE.LAYOUT.encode(dataclasses.asdict(self))

    @property
    def config_name(self) -> str:
        """STE.Config by name, or ``RESERVED(n)``."""
        try:
            return SteConfig(self.config).name
        except ValueError:
            return f"RESERVED({self.config})"

    def __str__(self) -> str:
        return (f"STE(V={self.v} Config={self.config_name} S1Fmt={self.s1fmt} "
                f"S1ContextPtr={self.s1_context_ptr:#x} S1CDMax={self.s1cdmax} "
                f"S1DSS={self.s1dss} EATS={self.eats} STRW={self.strw})")


def ste_words(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The eight double words of a 64-byte STE, in one unpack (the model's fast path).

    Raises ArchError if ``data`` is not exactly :data:`STE_SIZE` bytes.
    """
    if len(data) != STE_SIZE:
        raise ArchError(f"STE of {len(data)} bytes: expected {STE_SIZE}")
    return _STE_DWORDS.unpack(data)


def l1_std_fields(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(Span, L2Ptr)`` of an 8-byte level-1 descriptor, without building an :class:`L1Std`.

    Raises ArchError if ``data`` is not exactly :data:`L1_STD_SIZE` bytes.
    """
    if len(data) != L1_STD_SIZE:
        raise ArchError(f"level-1 stream table descriptor of {len(data)} bytes: "
                        f"expected {L1_STD_SIZE}")
    (dword,) = _L1_STD_DWORD.unpack(data)
    return L1STD.SPAN.get(dword), L1STD.L2PTR.get(dword)


def ste_dwords(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The eight double words of an STE as integers (for iommufd's vSTE words 0-1)."""
    return tuple(int.from_bytes(data[i:i + 8], "little") & DWORD_MASK
                 for i in range(0, STE_SIZE, 8))


class L1STD:
    """Level-1 stream table descriptor fields (IHI 0070 §5.1).

    ``Span`` is log2 of the number of STEs in the level-2 table plus one
    (0 = invalid, no level-2 table); ``L2Ptr`` is the level-2 table address.
    """

    SPAN = Field("span", 4, 0)
    L2PTR = Field("l2ptr", 51, 6, address=True)
    LAYOUT = RecordLayout("L1STD", L1_STD_SIZE, [SPAN, L2PTR])


@dataclasses.dataclass(frozen=True)
class L1Std:
    """A decoded level-1 stream table descriptor."""

    span: int = 0
    l2ptr: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> L1Std:
        """Decode 8 little-endian bytes."""
        return cls(**L1STD.LAYOUT.decode(data))

    def encode(self) -> bytes:
        """Encode to 8 little-endian bytes."""
        return L1STD.LAYOUT.encode(dataclasses.asdict(self))


def strtab_split_index(sid: int, split: int) -> tuple[int, int]:
    """A StreamID's (level-1 index, level-2 index) in a 2-level stream table (IHI 0070 §3.3.2)."""
    return sid >> split, sid & ((1 << split) - 1)


def l2_span_holds(span: int, l2_index: int) -> bool:
    """Whether a level-2 table of Span ``span`` (``2**(span-1)`` STEs) holds ``l2_index``."""
    return span > 0 and not l2_index >> (span - 1)


def id_fits(value: int, bits: int) -> bool:
    """Whether a StreamID/SubstreamID ``value`` is representable in ``bits`` bits."""
    return value >= 0 and not value >> bits
