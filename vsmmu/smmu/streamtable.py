"""Stream table and context descriptor lookups, with the validity policy.

Source: Arm IHI 0070 §3.3 "Data structures and translation procedure"
(stream table formats, level-1 descriptor Span), §5.2 STE validity ("STE
is ILLEGAL if ..."), §5.4 CD validity, §7.3 (which event each failure
records).

An STE lookup is classified as one of :class:`SteStatus`; the translator
decides what to do with it (install a vSTE, record C_BAD_STE, ...) and can
build the architectural event with :meth:`SteLookup.event`.

Policy where the architecture leaves a choice (CONSTRAINED UNPREDICTABLE):

* a level-1 descriptor with Span > SPLIT+1 is treated like Span=0: the SID
  is C_BAD_STREAMID;
* STRTAB_BASE_CFG.LOG2SIZE above IDR1.SIDSIZE is clamped to SIDSIZE, SPLIT
  above LOG2SIZE is clamped to LOG2SIZE; FMT=2-level without IDR0.ST_LEVEL
  advertising it, or a reserved FMT, is treated as linear;
* an STE is ILLEGAL for: Config using stage 2
  (not advertised); for stage 1 with substreams advertised (SSIDSIZE > 0):
  S1CDMax > SSIDSIZE, a reserved S1Fmt or a 2-level S1Fmt without CD2L when
  S1CDMax != 0; S1ContextPtr beyond the OAS; with IDR0.ATS advertised, for
  stage 1: a reserved EATS or EATS=split (needs stage 2);
* a CD is ILLEGAL for: AA64=0 (only AArch64 tables advertised), ENDI=1
  (little-endian only), HA or HD (no HTTU), S=1 (terminate-only stall
  model), an ASID above 255 without ASID16, and for each TTBx
  not disabled by EPDx: a reserved or unadvertised granule, or a TxSZ
  outside 16..39.

Not checked, because the architecture IGNOREs them here (IHI 0070 §5.2,
``IgnoreSTESTRW`` and the S1CDMax/S1Fmt/S1DSS descriptions): STRW, since
IDR0.HYP is not advertised (a Non-secure STE's STRW is RES0); S1CDMax, S1Fmt
and S1DSS when IDR1.SSIDSIZE is 0 (STE.S1ContextPtr then points at one CD);
EATS without IDR0.ATS, and for abort and bypass STEs (``SteIllegal`` checks
it only for ``Config != 0bx00`` with ATS implemented). A reserved Config
0b001-0b011 "behaves as 0b000": an abort with no event, not C_BAD_STE.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging

from vsmmu.arch.cd import (
    ASID8_LIMIT,
    CD_L2_4K_INDEX_BITS,
    CD_L2_64K_INDEX_BITS,
    CD_SIZE,
    CD_TXSZ_MAX,
    CD_TXSZ_MIN,
    L1_CD_SIZE,
    TG0_PAGE_SHIFT,
    TG1_PAGE_SHIFT,
    Cd,
    L1Cd,
    cd_split_index,
)
from vsmmu.arch.events import EVT, Event, EventId
from vsmmu.arch.registers import StrtabFmt
from vsmmu.arch.ste import (
    L1_STD_SIZE,
    STE,
    STE_SIZE,
    Eats,
    S1Fmt,
    Ste,
    SteConfig,
    id_fits,
    l1_std_fields,
    l2_span_holds,
    ste_words,
    strtab_split_index,
)
from vsmmu.smmu.features import SmmuFeatures
from vsmmu.smmu.interfaces import GuestMemory, GuestMemoryError, StreamTableConfig

logger = logging.getLogger(__name__)

# Plain-int copies for the CMD_CFGI_STE path: an enum member read through its class
# costs about as much as the whole STE unpack.
_STAGE2_CONFIGS = frozenset({int(SteConfig.S2_TRANS), int(SteConfig.NESTED)})
_CONFIG_S1_TRANS = int(SteConfig.S1_TRANS)
_S1_FMTS = frozenset(int(f) for f in S1Fmt)
_S1FMT_LINEAR = int(S1Fmt.LINEAR)
_EATS_NO_STAGE2 = frozenset({int(Eats.ABORT), int(Eats.FULL)})
_TWO_LEVEL = int(StrtabFmt.TWO_LEVEL)


class SteStatus(enum.Enum):
    """Outcome of looking up the STE of a StreamID."""

    VALID = "valid"
    INVALID = "invalid (V=0)"
    ILLEGAL = "illegal for the advertised features"
    BAD_STREAMID = "StreamID out of range"
    FETCH_ABORT = "fetch abort"


_VALID = SteStatus.VALID
_INVALID = SteStatus.INVALID
_ILLEGAL = SteStatus.ILLEGAL
_BAD_STREAMID = SteStatus.BAD_STREAMID
_FETCH_ABORT = SteStatus.FETCH_ABORT


class CdStatus(enum.Enum):
    """Outcome of looking up the CD of a SubstreamID."""

    VALID = "valid"
    INVALID = "invalid (V=0)"
    ILLEGAL = "illegal for the advertised features"
    BAD_SUBSTREAMID = "SubstreamID out of range"
    FETCH_ABORT = "fetch abort"
    NO_STAGE1 = "STE does not translate at stage 1"


@dataclasses.dataclass(frozen=True)
class SteLookup:
    """The STE of ``sid``: where it was (``address``), what it says, and whether it is usable.

    ``words`` are the eight raw double words fetched (None when nothing was
    fetched); :attr:`ste` decodes them on first use, so the command path,
    which needs only the status and words 0-1, never builds a :class:`Ste`.
    """

    sid: int
    status: SteStatus
    words: tuple[int, ...] | None = None
    address: int | None = None
    reason: str = ""

    @functools.cached_property
    def ste(self) -> Ste | None:
        """The fetched STE decoded by field, or None if nothing was fetched."""
        return None if self.words is None else Ste.from_words(self.words)

    def event(self, ssid: int | None = None) -> Event | None:
        """The event a transaction from ``sid`` (and ``ssid``) records, or None if VALID."""
        ids = {SteStatus.BAD_STREAMID: EventId.C_BAD_STREAMID,
               SteStatus.INVALID: EventId.C_BAD_STE, SteStatus.ILLEGAL: EventId.C_BAD_STE,
               SteStatus.FETCH_ABORT: EventId.F_STE_FETCH}
        event_id = ids.get(self.status)
        if event_id is None:
            return None
        fields = _stream_fields(self.sid, ssid)
        if event_id is EventId.F_STE_FETCH and self.address is not None:
            fields["fetch_addr"] = _fetch_addr(self.address)
        return Event(event_id, fields)


@dataclasses.dataclass(frozen=True)
class CdLookup:
    """The CD of ``sid``/``ssid``: where it was, what it says, and whether it is usable."""

    sid: int
    ssid: int
    status: CdStatus
    cd: Cd | None = None
    address: int | None = None
    reason: str = ""

    def event(self, ssv: bool = True) -> Event | None:
        """The event a transaction with this SubstreamID records, or None if VALID."""
        ids = {CdStatus.BAD_SUBSTREAMID: EventId.C_BAD_SUBSTREAMID,
               CdStatus.INVALID: EventId.C_BAD_CD, CdStatus.ILLEGAL: EventId.C_BAD_CD,
               CdStatus.FETCH_ABORT: EventId.F_CD_FETCH}
        event_id = ids.get(self.status)
        if event_id is None:
            return None
        fields = _stream_fields(self.sid, self.ssid if ssv else None)
        if event_id is EventId.F_CD_FETCH and self.address is not None:
            fields["fetch_addr"] = _fetch_addr(self.address)
        return Event(event_id, fields)


def _stream_fields(sid: int, ssid: int | None) -> dict[str, int]:
    fields = {"sid": EVT.SID.clamp(sid)}
    if ssid is not None:
        fields["ssv"] = 1
        fields["ssid"] = EVT.SSID.clamp(ssid)
    return fields


def _fetch_addr(address: int) -> int:
    return EVT.FETCH_ADDR.clamp(address)


def stream_table_config(features: SmmuFeatures, base: int, fmt: int, log2size: int,
                        split: int) -> StreamTableConfig:
    """Effective stream table configuration (clamped as documented in the module)."""
    log2size = min(log2size, features.sidsize)
    if fmt != StrtabFmt.TWO_LEVEL or not features.two_level_strtab:
        fmt = StrtabFmt.LINEAR
    return StreamTableConfig(base=base, fmt=fmt, log2size=log2size, split=min(split, log2size))


def lookup_ste(memory: GuestMemory, features: SmmuFeatures, table: StreamTableConfig,
               sid: int) -> SteLookup:
    """Find, fetch and classify the STE of ``sid``; never raises for guest data.

    Works on raw double words (one unpack per descriptor) because every
    CMD_CFGI_STE comes through here.
    """
    where = locate_ste(memory, table, sid)
    if isinstance(where, SteLookup):
        return where
    try:
        raw = memory.read(where, STE_SIZE)
    except GuestMemoryError as exc:
        return SteLookup(sid, _FETCH_ABORT, address=where, reason=str(exc))
    return classify_ste(features, sid, where, raw)


def locate_ste(memory: GuestMemory, table: StreamTableConfig, sid: int) -> int | SteLookup:
    """The GPA of the STE of ``sid``, or the BAD_STREAMID / FETCH_ABORT lookup that ends
    the search (a level-1 descriptor that cannot be read or does not cover ``sid``)."""
    if not id_fits(sid, table.log2size):
        return SteLookup(sid, _BAD_STREAMID,
                         reason=f"SID {sid:#x} >= 2**{table.log2size} stream table entries")
    if table.fmt != _TWO_LEVEL:
        return table.base + sid * STE_SIZE
    l1_index, l2_index = strtab_split_index(sid, table.split)
    l1_address = table.base + l1_index * L1_STD_SIZE
    try:
        span, l2ptr = l1_std_fields(memory.read(l1_address, L1_STD_SIZE))
    except GuestMemoryError as exc:
        return SteLookup(sid, _FETCH_ABORT, address=l1_address, reason=str(exc))
    if span == 0 or span > table.split + 1:
        return SteLookup(sid, _BAD_STREAMID, address=l1_address,
                         reason=f"level-1 Span={span} (valid 1..{table.split + 1})")
    if not l2_span_holds(span, l2_index):
        return SteLookup(sid, _BAD_STREAMID, address=l1_address,
                         reason=f"SID {sid:#x} beyond level-1 Span={span}")
    return l2ptr + l2_index * STE_SIZE


def classify_ste(features: SmmuFeatures, sid: int, address: int,
                 raw: bytes | bytearray | memoryview) -> SteLookup:
    """The lookup of ``sid`` whose 64-byte STE ``raw`` was fetched from ``address``."""
    words = ste_words(raw)
    if not STE.V.test(words[0]):
        return SteLookup(sid, _INVALID, words, address, "STE.V=0")
    reason = ste_words_illegal_reason(words[0], words[1], features)
    if reason is not None:
        return SteLookup(sid, _ILLEGAL, words, address, reason)
    return SteLookup(sid, _VALID, words, address)


class SteClassCache:
    """Classified STEs by SID: the same bytes at the same place classify the same way.

    Emptied when it holds :attr:`ENTRIES` (a guest with that many live streams pays a
    reclassification now and then, nothing more).
    """

    ENTRIES = 4096

    def __init__(self) -> None:
        self._cache: dict[int, tuple[bytes, SteLookup]] = {}

    def classify(self, features: SmmuFeatures, sid: int, address: int,
                 raw: bytes | bytearray | memoryview) -> SteLookup:
        """:func:`classify_ste`, reusing the last lookup of ``sid`` when nothing changed."""
        cached = self._cache.get(sid)
        if cached is not None and cached[0] == raw and cached[1].address == address:
            return cached[1]
        if len(self._cache) >= self.ENTRIES:
            self._cache.clear()
        lookup = classify_ste(features, sid, address, raw)
        self._cache[sid] = (bytes(raw), lookup)  # a copy: never a view of live RAM
        return lookup


def ste_illegal_reason(ste: Ste, features: SmmuFeatures) -> str | None:
    """Why a V=1 STE is ILLEGAL for ``features``, or None if it is not."""
    return _illegal_reason(features, ste.config, ste.s1fmt, ste.s1_context_ptr, ste.s1cdmax,
                           ste.eats)


def ste_words_illegal_reason(word0: int, word1: int, features: SmmuFeatures) -> str | None:
    """:func:`ste_illegal_reason` of a V=1 STE given as its raw double words 0 and 1."""
    return _illegal_reason(features, STE.CONFIG.get(word0), STE.S1FMT.get(word0),
                           STE.S1CONTEXTPTR.get(word0), STE.S1CDMAX.get(word0),
                           STE.EATS.get(word1))


def _illegal_reason(features: SmmuFeatures, config: int, s1fmt: int, s1_context_ptr: int,
                    s1cdmax: int, eats: int) -> str | None:
    # Config 0b001-0b011 are reserved but behave as 0b000 (abort, no event): not ILLEGAL.
    if config in _STAGE2_CONFIGS:
        return f"STE.Config={SteConfig(config).name} needs stage 2, which is not advertised"
    if config == _CONFIG_S1_TRANS:
        if features.ssidsize and s1cdmax > features.ssidsize:
            return f"STE.S1CDMax={s1cdmax} > IDR1.SSIDSIZE={features.ssidsize}"
        if features.ssidsize and s1cdmax:
            if s1fmt not in _S1_FMTS:
                return f"STE.S1Fmt={s1fmt} is reserved"
            if s1fmt != _S1FMT_LINEAR and not features.cd2l:
                return f"STE.S1Fmt={S1Fmt(s1fmt).name} without IDR0.CD2L"
        if not id_fits(s1_context_ptr, features.oas_bits):
            return (f"STE.S1ContextPtr={s1_context_ptr:#x} beyond the "
                    f"{features.oas_bits}-bit OAS")
    # EATS is checked only with IDR0.ATS advertised and a translating Config (SteIllegal).
    if features.ats and config == _CONFIG_S1_TRANS and eats not in _EATS_NO_STAGE2:
        return f"STE.EATS={eats} needs stage 2 (split) or is reserved"
    return None


def lookup_cd(memory: GuestMemory, features: SmmuFeatures, lookup: SteLookup,
              ssid: int) -> CdLookup:
    """Find, fetch and classify the CD of ``ssid`` under a VALID stage-1 STE."""
    ste = lookup.ste
    sid = lookup.sid
    if lookup.status is not SteStatus.VALID or ste is None or ste.config != SteConfig.S1_TRANS:
        return CdLookup(sid, ssid, CdStatus.NO_STAGE1, reason=f"STE is {lookup.status.value}")
    # With no substreams advertised S1CDMax is IGNORED: one CD (IHI 0070 §5.2).
    cdmax = ste.s1cdmax if features.ssidsize else 0
    if not id_fits(ssid, cdmax):
        return CdLookup(sid, ssid, CdStatus.BAD_SUBSTREAMID,
                        reason=f"SSID {ssid:#x} >= 2**S1CDMax={cdmax}")
    base = ste.s1_context_ptr
    if cdmax == 0 or ste.s1fmt == S1Fmt.LINEAR:
        address = base + ssid * CD_SIZE
    else:
        bits = CD_L2_4K_INDEX_BITS if ste.s1fmt == S1Fmt.TWO_LEVEL_4K else CD_L2_64K_INDEX_BITS
        l1_index, leaf_index = cd_split_index(ssid, bits)
        l1_address = base + l1_index * L1_CD_SIZE
        try:
            l1 = L1Cd.decode(memory.read(l1_address, L1_CD_SIZE))
        except GuestMemoryError as exc:
            return CdLookup(sid, ssid, CdStatus.FETCH_ABORT, address=l1_address, reason=str(exc))
        if not l1.v:
            return CdLookup(sid, ssid, CdStatus.BAD_SUBSTREAMID, address=l1_address,
                            reason="level-1 CD descriptor V=0")
        address = l1.l2ptr + leaf_index * CD_SIZE
    try:
        cd = Cd.decode(memory.read(address, CD_SIZE))
    except GuestMemoryError as exc:
        return CdLookup(sid, ssid, CdStatus.FETCH_ABORT, address=address, reason=str(exc))
    if not cd.v:
        return CdLookup(sid, ssid, CdStatus.INVALID, cd, address, "CD.V=0")
    reason = cd_illegal_reason(cd, features)
    if reason is not None:
        return CdLookup(sid, ssid, CdStatus.ILLEGAL, cd, address, reason)
    return CdLookup(sid, ssid, CdStatus.VALID, cd, address)


def cd_illegal_reason(cd: Cd, features: SmmuFeatures) -> str | None:
    """Why a V=1 CD is ILLEGAL for ``features``, or None if it is not."""
    if not cd.aa64:
        return "CD.AA64=0 but only AArch64 tables are advertised"
    if cd.endi:
        return "CD.ENDI=1 but only little-endian tables are advertised"
    # No HTTU and a terminate-only stall model are advertised (IHI 0070 §5.4 CdIllegal).
    if cd.ha or cd.hd:
        return "CD.HA/HD=1 but IDR0.HTTU is not advertised"
    if cd.s:
        return "CD.S=1 but IDR0.STALL_MODEL is terminate-only"
    if cd.asid >= ASID8_LIMIT and not features.asid16:
        return f"CD.ASID={cd.asid:#x} needs IDR0.ASID16"
    halves = (("TTB0", cd.epd0, cd.tg0, cd.t0sz, TG0_PAGE_SHIFT),
              ("TTB1", cd.epd1, cd.tg1, cd.t1sz, TG1_PAGE_SHIFT))
    for name, epd, tg, txsz, shifts in halves:
        if epd:
            continue
        shift = shifts.get(tg)
        if shift is None or not features.granule_supported(shift):
            return f"CD {name} granule TG={tg} is reserved or not advertised"
        if not CD_TXSZ_MIN <= txsz <= CD_TXSZ_MAX:
            return f"CD {name} TxSZ={txsz} outside {CD_TXSZ_MIN}..{CD_TXSZ_MAX}"
    return None
