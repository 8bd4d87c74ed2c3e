"""The raw-word STE lookup classifies as the architecture's SteIllegal rules say.

``lookup_ste`` works on raw double words (the CMD_CFGI_STE hot path); these
properties compare its status with a reference written here from IHI 0070
§5.2 (bit positions and the ILLEGAL conditions, with what this SMMU
advertises), on hypothesis-generated stream tables, including invalid,
ILLEGAL and unreadable ones.  The reference shares no code with the model.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vsmmu.arch.fields import DWORD_MASK, Field
from vsmmu.arch.registers import Oas, StrtabFmt
from vsmmu.arch.ste import L1_STD_SIZE, L1STD, STE, STE_SIZE, L1Std, Ste, strtab_split_index
from vsmmu.smmu import GuestRam, SmmuFeatures, SteStatus, StreamTableConfig
from vsmmu.smmu.streamtable import lookup_ste

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 16
TABLE = RAM_BASE
L2_TABLE = RAM_BASE + 0x8000
SPLIT = 4
LINEAR_LOG2SIZE = 4
TWO_LEVEL_LOG2SIZE = 8
_U64 = st.integers(0, DWORD_MASK)


def _any(field: Field) -> st.SearchStrategy[int]:
    """Any value of ``field`` (shifted down, also for address fields)."""
    return st.integers(0, field.mask)


@st.composite
def ste_word0(draw: st.DrawFn) -> int:
    """Word 0 built from plausible field values, sometimes with arbitrary bits on top."""
    word = (STE.V.place(draw(_any(STE.V))) | STE.CONFIG.place(draw(_any(STE.CONFIG)))
            | STE.S1FMT.place(draw(_any(STE.S1FMT))) | STE.S1CDMAX.place(draw(_any(STE.S1CDMAX)))
            | (draw(_any(STE.S1CONTEXTPTR)) << STE.S1CONTEXTPTR.lsb))
    return word | draw(st.one_of(st.just(0), _U64))


@st.composite
def ste_word1(draw: st.DrawFn) -> int:
    """Word 1 with EATS/STRW/S1DSS varied, sometimes with arbitrary bits on top."""
    word = (STE.EATS.place(draw(_any(STE.EATS))) | STE.STRW.place(draw(_any(STE.STRW)))
            | STE.S1DSS.place(draw(_any(STE.S1DSS))))
    return word | draw(st.one_of(st.just(0), _U64))


STE_RAW = st.builds(lambda w0, w1, rest: struct.pack("<8Q", w0, w1, *rest), ste_word0(),
                    ste_word1(), st.lists(_U64, min_size=6, max_size=6))
FEATURES = st.builds(SmmuFeatures, ats=st.booleans(), cd2l=st.booleans(),
                     ssidsize=st.integers(0, 20), oas=st.sampled_from(list(Oas)))


OAS_BITS_BY_ENCODING = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52}
"""IDR5.OAS encodings (IHI 0070 §6.3.6)."""


def reference_status(raw: bytes, features: SmmuFeatures) -> SteStatus:
    """The STE's status by IHI 0070 §5.2, from its raw bits."""
    word0, word1 = struct.unpack_from("<2Q", raw)
    if not word0 & 1:  # V, bit 0
        return SteStatus.INVALID
    config = (word0 >> 1) & 0b111  # bits [3:1]
    s1fmt = (word0 >> 4) & 0b11  # bits [5:4]
    context_ptr = word0 & ((1 << 52) - 1) & ~0x3F  # S1ContextPtr, bits [51:6]
    s1cdmax = word0 >> 59  # bits [63:59]
    eats = (word1 >> 28) & 0b11  # bits [93:92]
    illegal = False
    if config in (0b110, 0b111):  # stage 2 / nested: no stage 2 is advertised
        illegal = True
    if config == 0b101:  # stage 1 only
        if features.ssidsize and s1cdmax > features.ssidsize:
            illegal = True
        if features.ssidsize and s1cdmax and (s1fmt == 0b11 or (s1fmt and not features.cd2l)):
            illegal = True  # S1Fmt reserved, or a 2-level CD table without IDR0.CD2L
        if context_ptr >> OAS_BITS_BY_ENCODING[int(features.oas)]:
            illegal = True
        if features.ats and eats not in (0, 1):  # split needs stage 2; 3 is reserved
            illegal = True
    return SteStatus.ILLEGAL if illegal else SteStatus.VALID


@given(raw=STE_RAW, features=FEATURES, sid=st.integers(0, (1 << LINEAR_LOG2SIZE) - 1))
def test_linear_lookup_equals_field_decode(raw: bytes, features: SmmuFeatures, sid: int) -> None:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    ram.write(TABLE + sid * STE_SIZE, raw)
    table = StreamTableConfig(TABLE, StrtabFmt.LINEAR, LINEAR_LOG2SIZE, 0)
    found = lookup_ste(ram, features, table, sid)
    assert found.status is reference_status(raw, features)
    assert found.ste == Ste.decode(raw)
    assert found.words == struct.unpack("<8Q", raw)
    assert found.address == TABLE + sid * STE_SIZE
    assert (found.reason == "") is (found.status is SteStatus.VALID)


@given(raw=STE_RAW, span=_any(L1STD.SPAN), l2ptr=st.one_of(st.just(L2_TABLE), _U64),
       sid=st.integers(0, (1 << TWO_LEVEL_LOG2SIZE) - 1))
def test_two_level_lookup_equals_field_decode(raw: bytes, span: int, l2ptr: int,
                                              sid: int) -> None:
    features = SmmuFeatures()
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    l1_index, l2_index = strtab_split_index(sid, SPLIT)
    # Arbitrary bits around the fields too: the lookup must ignore them as decode does.
    descriptor = (l2ptr & ~L1STD.SPAN.inplace_mask) | L1STD.SPAN.place(span)
    ram.write(TABLE + l1_index * L1_STD_SIZE, struct.pack("<Q", descriptor))
    ste_address = L1Std.decode(struct.pack("<Q", descriptor)).l2ptr + l2_index * STE_SIZE
    if RAM_BASE <= ste_address <= RAM_BASE + RAM_SIZE - STE_SIZE:
        ram.write(ste_address, raw)
    table = StreamTableConfig(TABLE, StrtabFmt.TWO_LEVEL, TWO_LEVEL_LOG2SIZE, SPLIT)
    found = lookup_ste(ram, features, table, sid)
    span = L1Std.decode(struct.pack("<Q", descriptor)).span
    if span == 0 or span > SPLIT + 1 or l2_index >> (span - 1):
        assert found.status is SteStatus.BAD_STREAMID
        assert found.words is None and found.ste is None
    elif not RAM_BASE <= ste_address <= RAM_BASE + RAM_SIZE - STE_SIZE:
        assert found.status is SteStatus.FETCH_ABORT
        assert found.address == ste_address and found.ste is None
    else:
        assert found.status is reference_status(raw, features)
        assert found.ste == Ste.decode(raw)
        assert found.address == ste_address
