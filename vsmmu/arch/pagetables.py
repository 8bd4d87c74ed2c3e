"""AArch64 stage-1 translation table descriptors for the 4K, 16K and 64K granules.

Source: Arm ARM (DDI 0487) D8.3 "Translation table descriptor formats" and
D8.2 "Translation table walk" (VMSAv8-64), which the SMMU uses unchanged
for CD-described stage-1 tables (IHI 0070 §3.4 and §5.4).  Output addresses
up to 48 bits; with the 64K granule and a 52-bit OA the table/page/block
descriptor bits [15:12] hold OA[51:48].

:class:`Granule` answers the geometry questions of a walk (levels, index
of a VA at a level, which levels may hold blocks); :func:`classify` and
:func:`output_address` decode one descriptor; :func:`encode_table`,
:func:`encode_page` and :func:`encode_block` build them for tests and for
a simulated host.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

from vsmmu.arch.fields import ArchError, Field, RecordLayout

logger = logging.getLogger(__name__)

DESCRIPTOR_SIZE = 8
MAX_LEVEL = 3
OA_BITS = 48
OA_BITS_LPA = 52


class DescriptorKind(enum.Enum):
    """What a descriptor is at the level where it was read."""

    INVALID = "invalid"
    TABLE = "table"
    BLOCK = "block"
    PAGE = "page"
    RESERVED = "reserved"
    """Bits[1:0] = 0b01 at level 3: treated as invalid (translation fault)."""


class Ap(enum.IntEnum):
    """Stage-1 AP[2:1] data access permissions."""

    RW_PRIV = 0
    RW_ANY = 1
    RO_PRIV = 2
    RO_ANY = 3


class DESC:
    """Descriptor fields (DDI 0487 D8.3): lower/upper attributes and table attributes."""

    VALID = Field("valid", 0, 0)
    TYPE = Field("type", 1, 1)
    ATTRINDX = Field("attrindx", 4, 2)
    NS = Field("ns", 5, 5)
    AP = Field("ap", 7, 6)
    SH = Field("sh", 9, 8)
    AF = Field("af", 10, 10)
    NG = Field("ng", 11, 11)
    OA_HI_64K = Field("oa_hi_64k", 15, 12)
    DBM = Field("dbm", 51, 51)
    CONTIG = Field("contig", 52, 52)
    PXN = Field("pxn", 53, 53)
    UXN = Field("uxn", 54, 54)
    PXNTABLE = Field("pxntable", 59, 59)
    XNTABLE = Field("xntable", 60, 60)
    APTABLE = Field("aptable", 62, 61)
    NSTABLE = Field("nstable", 63, 63)
    OA = Field("oa", OA_BITS - 1, 12, address=True)
    """Address bits [47:12]; each granule and level masks off its own low bits."""

    LAYOUT = RecordLayout("Descriptor", DESCRIPTOR_SIZE, [
        VALID, TYPE, ATTRINDX, NS, AP, SH, AF, NG, DBM, CONTIG, PXN, UXN, PXNTABLE, XNTABLE,
        APTABLE, NSTABLE, OA,
    ])


@dataclasses.dataclass(frozen=True)
class Granule:
    """A translation granule: 4K, 16K or 64K pages (DDI 0487 D8.2)."""

    name: str
    page_shift: int
    block_levels: tuple[int, ...]

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return 1 << self.page_shift

    @property
    def stride(self) -> int:
        """VA bits resolved per level (a table holds ``2**stride`` 8-byte descriptors)."""
        return self.page_shift - 3

    def level_shift(self, level: int) -> int:
        """Lowest VA bit resolved at ``level`` (the size of a block/page there, in log2)."""
        return self.page_shift + (MAX_LEVEL - level) * self.stride

    def start_level(self, ia_bits: int) -> int:
        """First lookup level for an input address size of ``ia_bits`` (``64 - TxSZ``)."""
        levels = -(-(ia_bits - self.page_shift) // self.stride)
        return MAX_LEVEL + 1 - levels

    def index(self, va: int, level: int, ia_bits: int) -> int:
        """Index of ``va`` in the table at ``level`` for an ``ia_bits``-bit input range."""
        shift = self.level_shift(level)
        width = min(self.stride, ia_bits - shift)
        return (va >> shift) & ((1 << width) - 1)

    def block_allowed(self, level: int) -> bool:
        """Whether a block descriptor is valid at ``level`` (48-bit OA)."""
        return level in self.block_levels


GRANULE_4K = Granule("4K", 12, (1, 2))
GRANULE_16K = Granule("16K", 14, (2,))
GRANULE_64K = Granule("64K", 16, (2,))
GRANULES_BY_SHIFT: dict[int, Granule] = {g.page_shift: g for g in (GRANULE_4K, GRANULE_16K,
                                                                    GRANULE_64K)}
"""Granules by page shift (see :data:`vsmmu.arch.cd.TG0_PAGE_SHIFT`)."""


def classify(descriptor: int, level: int, granule: Granule) -> DescriptorKind:
    """What ``descriptor`` is when read at ``level`` of a ``granule`` walk."""
    if not DESC.VALID.test(descriptor):
        return DescriptorKind.INVALID
    is_table = DESC.TYPE.test(descriptor)
    if level == MAX_LEVEL:
        return DescriptorKind.PAGE if is_table else DescriptorKind.RESERVED
    if is_table:
        return DescriptorKind.TABLE
    return DescriptorKind.BLOCK if granule.block_allowed(level) else DescriptorKind.RESERVED


def output_address(descriptor: int, level: int, granule: Granule, *, oa_52: bool = False) -> int:
    """Next-table or output address held by a table/page/block ``descriptor``.

    For a block this is the block base (bits below the level's size cleared).
    With ``oa_52`` and the 64K granule, descriptor bits [15:12] supply OA[51:48].
    """
    kind_shift = granule.page_shift
    if level < MAX_LEVEL and not DESC.TYPE.test(descriptor):
        kind_shift = granule.level_shift(level)
    address = DESC.OA.get(descriptor) & ~((1 << kind_shift) - 1)
    if oa_52 and granule is GRANULE_64K:
        address |= DESC.OA_HI_64K.get(descriptor) << OA_BITS
    return address


def _check_aligned(address: int, shift: int, what: str) -> None:
    if address & ((1 << shift) - 1) or address >> OA_BITS:
        raise ArchError(f"{what} address {address:#x} is not {1 << shift:#x}-aligned "
                        f"below 2**{OA_BITS}")


def encode_table(next_table: int, granule: Granule, **attributes: int) -> int:
    """A table descriptor pointing at ``next_table`` (APTable, XNTable... as keywords)."""
    _check_aligned(next_table, granule.page_shift, "next-level table")
    return DESC.LAYOUT.encode_words({"valid": 1, "type": 1, "oa": next_table, **attributes})[0]


def encode_page(address: int, granule: Granule, *, af: int = 1, **attributes: int) -> int:
    """A level-3 page descriptor for ``address`` (AP, AttrIndx, UXN... as keywords)."""
    _check_aligned(address, granule.page_shift, "page")
    return DESC.LAYOUT.encode_words({"valid": 1, "type": 1, "af": af, "oa": address,
                                     **attributes})[0]


def encode_block(address: int, level: int, granule: Granule, *, af: int = 1,
                 **attributes: int) -> int:
    """A block descriptor at ``level`` for ``address``. Raises ArchError if not allowed."""
    if not granule.block_allowed(level):
        raise ArchError(f"{granule.name} granule: no block descriptor at level {level}; "
                        f"expected one of {granule.block_levels}")
    _check_aligned(address, granule.level_shift(level), "block")
    return DESC.LAYOUT.encode_words({"valid": 1, "type": 0, "af": af, "oa": address,
                                     **attributes})[0]
