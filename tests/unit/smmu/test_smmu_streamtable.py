"""STE and CD lookup: 2-level span, C_BAD_STREAMID, invalid/ILLEGAL policy, fetch aborts."""

from __future__ import annotations

import pytest

from vsmmu.arch import Cd, EventId, L1Std, Ste, SteConfig
from vsmmu.arch.cd import L1Cd, Tg0
from vsmmu.arch.registers import STRTAB_BASE_CFG, Reg, StrtabFmt
from vsmmu.arch.ste import STE_SIZE, Eats, S1Fmt, Strw
from vsmmu.smmu import CdStatus, GuestRam, RecordingConfigSink, SmmuFeatures, SmmuV3, SteStatus
from vsmmu.smmu.guest_driver import LINUX_STRTAB_SPLIT, GuestDriver

S1 = SteConfig.S1_TRANS


def test_sid_outside_a_level2_span_is_bad_streamid(driver: GuestDriver, smmu: SmmuV3) -> None:
    table = driver.ram.base + 0x30_0000
    # Span=3: the level-2 table holds 2**(3-1) = 4 STEs for SIDs 0x500..0x503.
    driver.write_l1_descriptor(5, L1Std(span=3, l2ptr=table))
    driver.ram.write(table + 3 * STE_SIZE, Ste(v=1, config=SteConfig.BYPASS).encode())
    assert smmu.lookup_ste(0x503).status is SteStatus.VALID
    outside = smmu.lookup_ste(0x504)
    assert outside.status is SteStatus.BAD_STREAMID
    event = outside.event()
    assert event is not None and event.event_id is EventId.C_BAD_STREAMID and event.sid == 0x504


@pytest.mark.parametrize("span", [0, LINUX_STRTAB_SPLIT + 2])
def test_invalid_or_reserved_span_is_bad_streamid(driver: GuestDriver, smmu: SmmuV3,
                                                  span: int) -> None:
    driver.write_l1_descriptor(6, L1Std(span=span, l2ptr=driver.ram.base))
    assert smmu.lookup_ste(0x600).status is SteStatus.BAD_STREAMID


def test_sid_beyond_log2size_or_sidsize_is_bad_streamid(driver: GuestDriver,
                                                        smmu: SmmuV3) -> None:
    assert smmu.lookup_ste(1 << 16).status is SteStatus.BAD_STREAMID
    assert smmu.lookup_ste(-1).status is SteStatus.BAD_STREAMID


def test_linear_stream_table(ram: GuestRam, sink: RecordingConfigSink) -> None:
    smmu = SmmuV3(ram, sink)
    smmu.write(Reg.STRTAB_BASE, 8, ram.base)
    smmu.write(Reg.STRTAB_BASE_CFG, 4, STRTAB_BASE_CFG.FMT.place(StrtabFmt.LINEAR)
               | STRTAB_BASE_CFG.LOG2SIZE.place(4))
    ram.write(ram.base + 15 * STE_SIZE, Ste(v=1, config=SteConfig.ABORT).encode())
    assert smmu.lookup_ste(15).status is SteStatus.VALID
    assert smmu.lookup_ste(14).status is SteStatus.INVALID
    assert smmu.lookup_ste(16).status is SteStatus.BAD_STREAMID


def test_ste_fetch_abort_gives_f_ste_fetch(ram: GuestRam, sink: RecordingConfigSink) -> None:
    smmu = SmmuV3(ram, sink)
    smmu.write(Reg.STRTAB_BASE, 8, ram.base + ram.size)
    smmu.write(Reg.STRTAB_BASE_CFG, 4, STRTAB_BASE_CFG.LOG2SIZE.place(4))
    found = smmu.lookup_ste(1)
    assert found.status is SteStatus.FETCH_ABORT
    event = found.event(ssid=2)
    assert event is not None and event.event_id is EventId.F_STE_FETCH
    assert event.fields["fetch_addr"] == ram.base + ram.size + STE_SIZE
    assert event.fields["ssv"] == 1 and event.fields["ssid"] == 2


@pytest.mark.parametrize(("ste", "why"), [
    (Ste(v=1, config=SteConfig.S2_TRANS), "stage 2"),
    (Ste(v=1, config=SteConfig.NESTED), "stage 2"),
    (Ste(v=1, config=S1, s1_context_ptr=1 << 47), "OAS"),
])
def test_illegal_stes(driver: GuestDriver, smmu: SmmuV3, ste: Ste, why: str) -> None:
    driver.write_ste(0x40, ste)
    found = smmu.lookup_ste(0x40)
    assert found.status is SteStatus.ILLEGAL and why in found.reason
    event = found.event()
    assert event is not None and event.event_id is EventId.C_BAD_STE


@pytest.mark.parametrize("ste", [
    Ste(v=1, config=S1, s1cdmax=4),
    Ste(v=1, config=S1, s1cdmax=4, s1fmt=3, s1dss=3),
    Ste(v=1, config=S1, s1fmt=2),
    Ste(v=1, config=S1, strw=Strw.EL2),
    Ste(v=1, config=S1, strw=1),
    Ste(v=1, config=S1, eats=Eats.FULL),
    Ste(v=1, config=SteConfig.BYPASS, eats=Eats.SPLIT),
    Ste(v=1, config=0b010),
])
def test_ignored_ste_fields_are_not_illegal(driver: GuestDriver, smmu: SmmuV3, ste: Ste) -> None:
    # IHI 0070 §5.2: with IDR1.SSIDSIZE=0, S1CDMax/S1Fmt/S1DSS are IGNORED; with IDR0.HYP=0 a
    # Non-secure STE's STRW is RES0 (IgnoreSTESTRW); EATS is checked only with IDR0.ATS=1.
    # Config 0b001-0b011 are reserved and behave as abort. QEMU's SMMUv3 agrees (differential
    # run).
    driver.write_ste(0x40, ste)
    assert smmu.lookup_ste(0x40).status is SteStatus.VALID
    if ste.config == S1:
        assert smmu.lookup_cd(smmu.lookup_ste(0x40)).address == ste.s1_context_ptr


def test_s1cdmax_beyond_ssidsize_is_illegal_with_substreams(
        ram: GuestRam, sink: RecordingConfigSink) -> None:
    smmu = SmmuV3(ram, sink, SmmuFeatures(ssidsize=2))
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    drv.write_ste(1, Ste(v=1, config=S1, s1cdmax=4))
    found = smmu.lookup_ste(1)
    assert found.status is SteStatus.ILLEGAL and "SSIDSIZE" in found.reason


def test_eats_legal_only_when_ats_advertised(ram: GuestRam, sink: RecordingConfigSink) -> None:
    smmu = SmmuV3(ram, sink, SmmuFeatures(ats=True))
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    drv.write_ste(1, Ste(v=1, config=S1, eats=Eats.FULL))
    drv.write_ste(2, Ste(v=1, config=S1, eats=Eats.SPLIT))
    assert smmu.lookup_ste(1).status is SteStatus.VALID
    assert smmu.lookup_ste(2).status is SteStatus.ILLEGAL


def test_invalid_ste_event_is_c_bad_ste(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.write_ste(0x41, Ste(v=0, config=S1))
    found = smmu.lookup_ste(0x41)
    assert found.status is SteStatus.INVALID
    event = found.event()
    assert event is not None and event.event_id is EventId.C_BAD_STE and event.sid == 0x41
    assert smmu.lookup_ste(0x42).event() is not None  # never written: V=0 too


GOOD_CD = Cd(v=1, aa64=1, t0sz=16, tg0=Tg0.GRANULE_4K, epd1=1, asid=3, ttb0=0x4010_0000)


def test_single_cd(driver: GuestDriver, smmu: SmmuV3) -> None:
    cd_at = driver.ram.base + 0x8_0000
    driver.ram.write(cd_at, GOOD_CD.encode())
    driver.write_ste(1, Ste(v=1, config=S1, s1_context_ptr=cd_at))
    ste = smmu.lookup_ste(1)
    assert smmu.lookup_cd(ste, 0).cd == GOOD_CD
    bad = smmu.lookup_cd(ste, 1)
    assert bad.status is CdStatus.BAD_SUBSTREAMID
    event = bad.event()
    assert event is not None and event.event_id is EventId.C_BAD_SUBSTREAMID


def test_two_level_cd_table(ram: GuestRam, sink: RecordingConfigSink) -> None:
    smmu = SmmuV3(ram, sink, SmmuFeatures(ssidsize=10))
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    l1 = ram.base + 0x8_0000
    leaf = ram.base + 0x9_0000
    ram.write(l1 + 1 * 8, L1Cd(v=1, l2ptr=leaf).encode())  # SSIDs 64..127
    ram.write(leaf + 5 * 64, GOOD_CD.encode())
    drv.write_ste(2, Ste(v=1, config=S1, s1_context_ptr=l1, s1cdmax=10,
                         s1fmt=S1Fmt.TWO_LEVEL_4K))
    ste = smmu.lookup_ste(2)
    assert smmu.lookup_cd(ste, 64 + 5).status is CdStatus.VALID
    assert smmu.lookup_cd(ste, 64 + 6).status is CdStatus.INVALID
    assert smmu.lookup_cd(ste, 0).status is CdStatus.BAD_SUBSTREAMID  # L1CD.V=0
    assert smmu.lookup_cd(ste, 1 << 10).status is CdStatus.BAD_SUBSTREAMID


@pytest.mark.parametrize(("cd", "why"), [
    (Cd(v=1, aa64=0, t0sz=16, epd1=1), "AA64"),
    (Cd(v=1, aa64=1, t0sz=16, epd1=1, endi=1), "ENDI"),
    (Cd(v=1, aa64=1, t0sz=12, epd1=1), "TxSZ"),
    (Cd(v=1, aa64=1, t0sz=16, tg0=3, epd1=1), "granule"),
    (Cd(v=1, aa64=1, t0sz=16, t1sz=16, tg1=0), "granule"),
])
def test_illegal_cds_give_c_bad_cd(driver: GuestDriver, smmu: SmmuV3, cd: Cd,
                                   why: str) -> None:
    cd_at = driver.ram.base + 0x8_0000
    driver.ram.write(cd_at, cd.encode())
    driver.write_ste(3, Ste(v=1, config=S1, s1_context_ptr=cd_at))
    found = smmu.lookup_cd(smmu.lookup_ste(3), 0)
    assert found.status is CdStatus.ILLEGAL and why in found.reason
    event = found.event(ssv=False)
    assert event is not None and event.event_id is EventId.C_BAD_CD
    assert "ssv" not in event.fields


def test_cd_fetch_abort_and_non_stage1(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.write_ste(4, Ste(v=1, config=S1, s1_context_ptr=driver.ram.base + driver.ram.size))
    found = smmu.lookup_cd(smmu.lookup_ste(4), 0)
    assert found.status is CdStatus.FETCH_ABORT
    event = found.event()
    assert event is not None and event.event_id is EventId.F_CD_FETCH
    driver.write_ste(5, Ste(v=1, config=SteConfig.BYPASS))
    assert smmu.lookup_cd(smmu.lookup_ste(5), 0).status is CdStatus.NO_STAGE1
