"""``vste_for`` masks raw STE words; it must equal the decode → encode → mask path.

The reference below is the field-by-field construction: decode the guest STE
into a :class:`Ste`, encode it back to 64 bytes, keep the nesting-allowed
fields.  Checked on hypothesis-generated STEs of every classification
(VALID, INVALID, ILLEGAL), plus lookups that fetched nothing.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vsmmu.arch.fields import DWORD_MASK, Field
from vsmmu.arch.registers import StrtabFmt
from vsmmu.arch.ste import STE, STE_SIZE, Ste, SteConfig, ste_dwords
from vsmmu.iommufd.uapi import VSTE_WORD0_ALLOWED, VSTE_WORD1_ALLOWED
from vsmmu.nesting import ABORT_VSTE, BYPASS_VSTE, INVALID_VSTE, VsteWords, vste_for
from vsmmu.smmu import GuestRam, SmmuFeatures, SteLookup, SteStatus, StreamTableConfig
from vsmmu.smmu.streamtable import lookup_ste

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 12
LOG2SIZE = 4
_U64 = st.integers(0, DWORD_MASK)


def _any(field: Field) -> st.SearchStrategy[int]:
    return st.integers(0, field.mask)


@st.composite
def guest_ste(draw: st.DrawFn) -> bytes:
    """64 bytes whose words 0-1 hit every Config/EATS/STRW, with or without stray bits."""
    word0 = (STE.V.place(draw(_any(STE.V))) | STE.CONFIG.place(draw(_any(STE.CONFIG)))
             | STE.S1FMT.place(draw(_any(STE.S1FMT)))
             | STE.S1CDMAX.place(draw(st.sampled_from([0, 1, STE.S1CDMAX.mask])))
             | (draw(_any(STE.S1CONTEXTPTR)) << STE.S1CONTEXTPTR.lsb))
    word1 = (STE.EATS.place(draw(_any(STE.EATS))) | STE.STRW.place(draw(_any(STE.STRW)))
             | STE.S1DSS.place(draw(_any(STE.S1DSS))) | STE.S1CIR.place(draw(_any(STE.S1CIR))))
    word0 |= draw(st.one_of(st.just(0), _U64))
    word1 |= draw(st.one_of(st.just(0), _U64))
    rest = draw(st.lists(_U64, min_size=6, max_size=6))
    return struct.pack("<8Q", word0, word1, *rest)


def reference_vste(status: SteStatus, raw: bytes) -> VsteWords:
    """The vSTE through the decoded STE (the path ``vste_for`` replaces)."""
    if status is SteStatus.VALID:
        ste = Ste.decode(raw)
        if ste.config < SteConfig.BYPASS:  # 0b0xx: reserved values behave as abort (§5.2)
            return ABORT_VSTE
        if ste.config == SteConfig.BYPASS:
            return BYPASS_VSTE
        words = ste_dwords(ste.encode())
        return VsteWords(words[0] & VSTE_WORD0_ALLOWED, words[1] & VSTE_WORD1_ALLOWED)
    if status in (SteStatus.INVALID, SteStatus.ILLEGAL):
        return INVALID_VSTE
    return ABORT_VSTE


@given(raw=guest_ste(), ats=st.booleans(), ssidsize=st.integers(0, 20))
def test_vste_from_raw_words_equals_decode_encode(raw: bytes, ats: bool, ssidsize: int) -> None:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    ram.write(RAM_BASE, raw)
    features = SmmuFeatures(ats=ats, ssidsize=ssidsize)
    lookup = lookup_ste(ram, features, StreamTableConfig(RAM_BASE, StrtabFmt.LINEAR, LOG2SIZE, 0),
                        0)
    vste = vste_for(lookup)
    assert vste == reference_vste(lookup.status, raw)
    assert not vste.word0 & ~VSTE_WORD0_ALLOWED and not vste.word1 & ~VSTE_WORD1_ALLOWED


def test_vste_of_lookups_without_an_ste_is_abort() -> None:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    table = StreamTableConfig(RAM_BASE + RAM_SIZE - STE_SIZE, StrtabFmt.LINEAR, LOG2SIZE, 0)
    unreadable = lookup_ste(ram, SmmuFeatures(), table, 1)
    assert unreadable.status is SteStatus.FETCH_ABORT
    assert vste_for(unreadable) == ABORT_VSTE
    assert vste_for(SteLookup(1 << LOG2SIZE, SteStatus.BAD_STREAMID)) == ABORT_VSTE


def test_vste_without_substreams_points_at_one_cd() -> None:
    # IHI 0070 §5.2: with IDR1.SSIDSIZE=0, S1CDMax, S1Fmt and S1DSS are IGNORED, so a host
    # SMMU that has substreams must not see them (it would walk a CD table instead).
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    ste = Ste(v=1, config=SteConfig.S1_TRANS, s1cdmax=3, s1fmt=1, s1dss=2,
              s1_context_ptr=0x4000_1000, s1cir=1)
    ram.write(RAM_BASE, ste.encode())
    lookup = lookup_ste(ram, SmmuFeatures(), StreamTableConfig(RAM_BASE, StrtabFmt.LINEAR,
                                                               LOG2SIZE, 0), 0)
    plain = vste_for(lookup, substreams=False)
    assert STE.S1CDMAX.get(plain.word0) == 0 and STE.S1FMT.get(plain.word0) == 0
    assert STE.S1DSS.get(plain.word1) == 0 and STE.S1CIR.get(plain.word1) == 1
    assert STE.S1CONTEXTPTR.get(plain.word0) == 0x4000_1000
    assert STE.S1CDMAX.get(vste_for(lookup).word0) == 3
