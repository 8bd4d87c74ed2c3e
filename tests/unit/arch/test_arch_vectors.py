"""Encode/decode vectors for vsmmu.arch, each built by hand from the field tables.

Every expected integer below is assembled bit by bit in the test from the
positions the cited section of the architecture gives, so a wrong field
table in vsmmu.arch fails here.  Sources:

* Arm IHI 0070 (SMMUv3) §5.2 "Stream Table Entry", §5.1 "Level 1 Stream
  Table Descriptor", §5.4 "Context Descriptor", chapter 4 "Commands",
  §7.3 "Event records", §6.3 register descriptions.
* Arm DDI 0487 D8.3 "Translation table descriptor formats".
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsmmu.arch import (
    GRANULE_4K,
    GRANULE_16K,
    GRANULE_64K,
    ArchError,
    Cd,
    CmdOpcode,
    DescriptorKind,
    EventClass,
    EventId,
    Ste,
    SteConfig,
    classify,
    decode_command,
    decode_event,
    encode_block,
    encode_cfgi_all,
    encode_command,
    encode_event,
    encode_page,
    encode_table,
    output_address,
)
from vsmmu.arch.cd import Tg0
from vsmmu.arch.commands import SyncCs, TlbiTg, cfgi_ste_range_sids, tlbi_range_bytes
from vsmmu.arch.fields import Field, bytes_from_words, words_from_bytes
from vsmmu.arch.pagetables import Ap
from vsmmu.arch.registers import QueueIndex, Reg, reg_width
from vsmmu.arch.ste import L1Std
from vsmmu.smmu.features import SmmuFeatures


def dwords(*words: int) -> bytes:
    return b"".join(w.to_bytes(8, "little") for w in words)


def test_ste_vector_ihi0070_5_2() -> None:
    # IHI 0070 §5.2: V[0], Config[3:1], S1Fmt[5:4], S1ContextPtr[51:6], S1CDMax[63:59];
    # dw1: S1DSS[65:64], S1CIR[67:66], EATS[93:92], STRW[95:94], SHCFG[109:108].
    ctx = 0x8000_1000
    dw0 = 1 | (0b101 << 1) | (1 << 4) | ctx | (3 << 59)
    dw1 = 2 | (1 << 2) | (1 << (92 - 64)) | (1 << (108 - 64))
    dw3 = 0x4000_0000  # S2TTB[243:196] sits in dw3 bits [51:4]
    data = dwords(dw0, dw1, 0, dw3, 0, 0, 0, 0)
    ste = Ste.decode(data)
    assert (ste.v, ste.config, ste.s1fmt, ste.s1_context_ptr, ste.s1cdmax) == (
        1, SteConfig.S1_TRANS, 1, ctx, 3)
    assert (ste.s1dss, ste.s1cir, ste.eats, ste.shcfg, ste.s2ttb) == (2, 1, 1, 1, dw3)
    assert ste.encode() == data
    assert "S1_TRANS" in str(ste)


def test_ste_reserved_config_prints_as_reserved() -> None:
    assert "RESERVED(2)" in str(Ste(v=1, config=2))


def test_l1_std_vector_ihi0070_5_1() -> None:
    # IHI 0070 §5.1: Span[4:0], L2Ptr[51:6].
    raw = dwords(9 | 0x4004_0000)
    assert L1Std.decode(raw) == L1Std(span=9, l2ptr=0x4004_0000)
    assert L1Std(span=9, l2ptr=0x4004_0000).encode() == raw


def test_cd_vector_ihi0070_5_4() -> None:
    # IHI 0070 §5.4: T0SZ[5:0], TG0[7:6], EPD1[30], V[31], IPS[34:32], AA64[41],
    # ASID[63:48]; TTB0[51:4] in dw1; MAIR in dw3.
    dw0 = 16 | (Tg0.GRANULE_64K << 6) | (1 << 30) | (1 << 31) | (5 << 32) | (1 << 41) \
        | (0x1234 << 48)
    data = dwords(dw0, 0x4020_0000, 0, 0xFF04_4400, 0, 0, 0, 0)
    cd = Cd.decode(data)
    assert (cd.t0sz, cd.tg0, cd.epd1, cd.v, cd.ips, cd.aa64, cd.asid) == (
        16, Tg0.GRANULE_64K, 1, 1, 5, 1, 0x1234)
    assert (cd.ttb0, cd.mair) == (0x4020_0000, 0xFF04_4400)
    assert cd.encode() == data


def test_command_vectors_ihi0070_chapter4() -> None:
    # §4.3.1 CMD_CFGI_STE: opcode 0x03, SID[63:32], Leaf dw1[0].
    assert encode_command(CmdOpcode.CFGI_STE, sid=0x10, leaf=1) == dwords((0x10 << 32) | 0x03, 1)
    # §4.3.3 CMD_CFGI_ALL = CFGI_STE_RANGE (0x04) with Range dw1[4:0] = 31.
    assert encode_cfgi_all() == dwords(0x04, 31)
    # §4.4.2 CMD_TLBI_NH_VA: NUM[16:12], SCALE[24:20], VMID[47:32], ASID[63:48];
    # dw1 Leaf[0], TTL[9:8], TG[11:10], Address[63:12].
    va = 0xFFFF_0000_1234_5000
    dw0 = 0x12 | (3 << 12) | (1 << 20) | (5 << 48)
    dw1 = 1 | (3 << 8) | (TlbiTg.GRANULE_4K << 10) | va
    raw = encode_command(CmdOpcode.TLBI_NH_VA, num=3, scale=1, asid=5, leaf=1, ttl=3,
                         tg=TlbiTg.GRANULE_4K, address=va)
    assert raw == dwords(dw0, dw1)
    cmd = decode_command(raw)
    assert cmd.opcode is CmdOpcode.TLBI_NH_VA
    assert (cmd.fields["asid"], cmd.fields["address"], cmd.fields["num"]) == (5, va, 3)
    assert str(cmd).startswith("TLBI_NH_VA(")
    # §4.8 CMD_SYNC: CS[13:12] (SEV = 2), MSIData[63:32], MSIAddr dw1[51:2].
    assert encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV) == dwords(0x46 | (2 << 12), 0)
    # §4.5 CMD_ATC_INV: Global[9], SSV[11], SSID[31:12], SID[63:32]; Size dw1[5:0], Addr[63:12].
    raw = encode_command(CmdOpcode.ATC_INV, sid=3, ssv=1, ssid=7, size=4, address=0x1000)
    assert raw == dwords(0x40 | (1 << 11) | (7 << 12) | (3 << 32), 4 | 0x1000)
    # §4.3.2 CMD_CFGI_CD: SSID[31:12], SID[63:32], Leaf dw1[0].
    raw = encode_command(CmdOpcode.CFGI_CD, sid=2, ssid=0xABC, leaf=1)
    assert raw == dwords(0x05 | (0xABC << 12) | (2 << 32), 1)


def test_command_errors_and_unknown_opcode() -> None:
    with pytest.raises(ArchError, match="not an SMMUv3 opcode"):
        encode_command(0x7F)
    with pytest.raises(ArchError, match="no field named"):
        encode_command(CmdOpcode.SYNC, sid=1)
    with pytest.raises(ArchError, match="does not fit"):
        encode_command(CmdOpcode.CFGI_STE, sid=1 << 32)
    unknown = decode_command(dwords(0x7F, 0))
    assert unknown.name == "UNKNOWN(0x7f)" and not unknown.fields


def test_range_helpers_ihi0070_4_3_3_and_4_4_1() -> None:
    # CFGI_STE_RANGE invalidates 2**(Range+1) SIDs aligned to that size.
    assert cfgi_ste_range_sids(0x13, 1) == (0x10, 0x13)
    assert cfgi_ste_range_sids(0x13, 31) == (0, (1 << 32) - 1)
    # Range TLBI: (NUM+1) * 2**SCALE granules.
    assert tlbi_range_bytes(TlbiTg.GRANULE_4K, 3, 1) == 4 * 2 * 4096
    assert tlbi_range_bytes(TlbiTg.NONE, 3, 1) == 0


def test_event_vectors_ihi0070_7_3() -> None:
    # §7.3: EventID[7:0], SSV[11], SubstreamID[31:12], StreamID[63:32].
    raw = encode_event(EventId.C_BAD_STE, sid=0x42, ssv=1, ssid=3)
    assert raw == dwords(0x04 | (1 << 11) | (3 << 12) | (0x42 << 32), 0, 0, 0)
    # §7.3.12 F_TRANSLATION: RnW[35], CLASS[41:40]; InputAddr dw2; IPA[51:12] dw3.
    raw = encode_event(EventId.F_TRANSLATION, sid=1, rnw=1, **{"class": EventClass.IN},
                       input_addr=0x1000, ipa=0x2000)
    assert raw == dwords(0x10 | (1 << 32), (1 << 35) | (2 << 40), 0x1000, 0x2000)
    # §7.3.4 F_STE_FETCH: FetchAddr[51:3] in dw3.
    raw = encode_event(EventId.F_STE_FETCH, sid=9, fetch_addr=0x4000_0048)
    assert raw == dwords(0x03 | (9 << 32), 0, 0, 0x4000_0048)
    event = decode_event(raw)
    assert event.name == "F_STE_FETCH" and event.sid == 9
    assert str(event) == "F_STE_FETCH(sid=0x9, fetch_addr=0x40000048)"
    assert decode_event(dwords(0x99, 0, 0, 0)).name == "UNKNOWN(0x99)"


def test_default_id_registers_ihi0070_6_3() -> None:
    ids = SmmuFeatures().id_registers()
    # IDR0: S1P[1], TTF[3:2]=AArch64(2), COHACC[4], ASID16[12], MSI[13], CD2L[19],
    # TTENDIAN[22:21]=LE(2), STALL_MODEL[25:24]=1, TERM_MODEL[26], ST_LEVEL[28:27]=1.
    idr0 = (1 << 1) | (2 << 2) | (1 << 4) | (1 << 12) | (1 << 13) | (1 << 19) | (2 << 21) \
        | (1 << 24) | (1 << 26) | (1 << 27)
    assert ids[Reg.IDR0] == idr0
    # IDR1: SIDSIZE[5:0]=16, EVENTQS[20:16]=8, CMDQS[25:21]=10.
    assert ids[Reg.IDR1] == 16 | (8 << 16) | (10 << 21)
    # IDR5: OAS[2:0]=44 bits(4), GRAN4K[4], GRAN16K[5], GRAN64K[6].
    assert ids[Reg.IDR5] == 4 | (1 << 4) | (1 << 5) | (1 << 6)
    assert ids[Reg.IDR3] == 0
    assert SmmuFeatures(ril=True).id_registers()[Reg.IDR3] == 1 << 10
    assert SmmuFeatures(ats=True).id_registers()[Reg.IDR0] == idr0 | (1 << 10)


def test_register_map_ihi0070_6_2() -> None:
    assert (Reg.CR0, Reg.GBPA, Reg.STRTAB_BASE, Reg.CMDQ_PROD) == (0x20, 0x44, 0x80, 0x98)
    assert (Reg.EVENTQ_PROD, Reg.EVENTQ_CONS) == (0x100A8, 0x100AC)
    assert reg_width(Reg.CMDQ_BASE) == 8 and reg_width(Reg.CMDQ_PROD) == 4


def test_queue_index_wrap_ihi0070_3_5() -> None:
    q = QueueIndex(2)
    p = 0
    seen = []
    for _ in range(9):
        seen.append((q.wrap(p), q.index(p)))
        p = q.increment(p)
    assert seen == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (0, 0)]
    assert q.is_full(0b100, 0b000) and q.is_empty(0b101, 0b101)
    assert q.used(0b001, 0b110) == 3


def test_page_descriptors_ddi0487_d8_3() -> None:
    # Page (level 3): bits[1:0]=0b11, AttrIndx[4:2], AP[7:6], AF[10], OA[47:12].
    page = encode_page(0x4123_4000, GRANULE_4K, ap=Ap.RO_ANY, attrindx=1)
    assert page == 0b11 | (1 << 2) | (3 << 6) | (1 << 10) | 0x4123_4000
    assert classify(page, 3, GRANULE_4K) is DescriptorKind.PAGE
    assert output_address(page, 3, GRANULE_4K) == 0x4123_4000
    # Block (level 2, 4K => 2 MiB): bits[1:0]=0b01.
    block = encode_block(0x4020_0000, 2, GRANULE_4K)
    assert block == 0b01 | (1 << 10) | 0x4020_0000
    assert classify(block, 2, GRANULE_4K) is DescriptorKind.BLOCK
    assert output_address(block | 0x1000, 2, GRANULE_4K) == 0x4020_0000
    table = encode_table(0x4000_0000, GRANULE_64K)
    assert table == 0b11 | 0x4000_0000
    assert classify(table, 2, GRANULE_64K) is DescriptorKind.TABLE
    assert classify(block, 3, GRANULE_4K) is DescriptorKind.RESERVED
    assert classify(block, 1, GRANULE_64K) is DescriptorKind.RESERVED
    assert classify(0, 1, GRANULE_4K) is DescriptorKind.INVALID
    # 64K granule, 52-bit OA: descriptor bits [15:12] hold OA[51:48].
    assert output_address(table | (0xA << 12), 3, GRANULE_64K, oa_52=True) == (
        0xA << 48) | 0x4000_0000
    with pytest.raises(ArchError, match="no block descriptor"):
        encode_block(0, 1, GRANULE_16K)
    with pytest.raises(ArchError, match="aligned"):
        encode_page(0x1000, GRANULE_64K)


def test_granule_geometry_ddi0487_d8_2() -> None:
    assert GRANULE_4K.start_level(48) == 0 and GRANULE_4K.start_level(39) == 1
    assert GRANULE_16K.start_level(48) == 0 and GRANULE_16K.index(1 << 47, 0, 48) == 1
    assert GRANULE_64K.start_level(48) == 1 and GRANULE_64K.start_level(42) == 2
    assert GRANULE_4K.index(0x0000_7FFF_FFFF_F000, 0, 48) == 0x0FF
    assert GRANULE_4K.index(0x0000_7FFF_FFFF_F000, 3, 48) == 0x1FF
    assert GRANULE_64K.level_shift(2) == 29


def test_field_rejects_bad_values() -> None:
    f = Field("x", 7, 4)
    assert f.put(0xFFFF, 0x3) == 0xFF3F
    with pytest.raises(ArchError, match="does not fit 4 bits"):
        f.place(0x10)
    a = Field("addr", 51, 12, address=True)
    with pytest.raises(ArchError, match="outside"):
        a.place(0x1001)
    with pytest.raises(ArchError, match="shorter"):
        words_from_bytes(b"\0" * 7, 1)


@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=8, max_size=8))
def test_ste_and_cd_decode_encode_is_stable(words: list[int]) -> None:
    data = bytes_from_words(words)
    ste = Ste.decode(data)
    assert Ste.decode(ste.encode()) == ste
    cd = Cd.decode(data)
    assert Cd.decode(cd.encode()) == cd


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_command_decode_encode_is_stable(dw0: int, dw1: int) -> None:
    cmd = decode_command(dwords(dw0, dw1))
    if cmd.name.startswith("UNKNOWN"):
        return
    assert decode_command(cmd.encode()) == cmd


def test_table_index_helpers_ihi0070_3_3() -> None:
    from vsmmu.arch.cd import cd_split_index
    from vsmmu.arch.ste import id_fits, l2_span_holds, strtab_split_index

    # SPLIT=8: SID 0x1234 -> level-1 descriptor 0x12, STE 0x34 of its level-2 table.
    assert strtab_split_index(0x1234, 8) == (0x12, 0x34)
    # Span=3 holds 2**(3-1) = 4 STEs; Span=0 holds none.
    assert l2_span_holds(3, 3) and not l2_span_holds(3, 4) and not l2_span_holds(0, 0)
    # 2-level 4K CD table: 64 CDs per leaf.
    assert cd_split_index(64 + 5, 6) == (1, 5)
    assert id_fits(0xFFFF, 16) and not id_fits(0x10000, 16) and not id_fits(-1, 16)
