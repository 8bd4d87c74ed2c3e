"""Command queue: wrap, CERROR_ILL/ABT at the exact index, freeze until GERRORN, SYNC."""

from __future__ import annotations

import pytest

from vsmmu.arch import CError, CmdOpcode, encode_command
from vsmmu.arch.commands import SyncCs
from vsmmu.arch.registers import CR0, GERROR, QUEUE_BASE, QueueIndex, Reg
from vsmmu.smmu import RecordingConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

TLBI_ALL = encode_command(CmdOpcode.TLBI_NH_ALL)
SYNC = encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)


def cmdq_err_active(smmu: SmmuV3) -> bool:
    return GERROR.CMDQ_ERR.test(smmu.read(Reg.GERROR, 4) ^ smmu.read(Reg.GERRORN, 4))


def test_queue_wraps_over_several_laps(driver: GuestDriver, smmu: SmmuV3,
                                       sink: RecordingConfigSink) -> None:
    size = driver.cmdq.size
    issued = 0
    laps_seen = set()
    while issued < 4 * size + 7:
        cons = driver.issue(TLBI_ALL, TLBI_ALL, TLBI_ALL, sync=False)
        issued += 3
        assert driver.cmdq.pointer(cons) == driver.cmdq_prod
        laps_seen.add(driver.cmdq.wrap(driver.cmdq_prod))
    assert laps_seen == {0, 1}
    handled = sum(len(c[1]) for c in sink.calls if c[0] == "invalidate")
    assert handled == issued
    assert not cmdq_err_active(smmu)


def test_unknown_opcode_is_cerror_ill_at_exact_index_and_cons_freezes(
        driver: GuestDriver, smmu: SmmuV3, sink: RecordingConfigSink) -> None:
    start = driver.cmdq_prod
    bad = (0x7F).to_bytes(16, "little")
    cons = driver.issue(TLBI_ALL, TLBI_ALL, bad, TLBI_ALL, sync=True)
    failing = driver.cmdq.increment(start, 2)
    assert driver.cmdq.pointer(cons) == failing
    assert driver.cmdq_cons_error() == CError.ILL
    assert cmdq_err_active(smmu)
    # The two commands before the bad one were handed over; nothing after it.
    assert sink.calls == [("invalidate", [CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ALL])]
    # Frozen: more PROD writes do not move CONS while CMDQ_ERR is active.
    driver.issue(TLBI_ALL)
    assert driver.cmdq_cons_pointer() == failing
    # Linux replaces the bad command by a SYNC and acknowledges GERRORN: queue resumes.
    driver.replace_command(failing, SYNC)
    assert GERROR.CMDQ_ERR.test(driver.acknowledge_gerror())
    assert driver.cmdq_cons_pointer() == driver.cmdq_prod
    assert not cmdq_err_active(smmu)


def test_sink_refusing_invalidation_k_stops_at_that_command(
        driver: GuestDriver, smmu: SmmuV3, sink: RecordingConfigSink) -> None:
    sink.fail_opcodes = {CmdOpcode.CFGI_CD_ALL}
    start = driver.cmdq_prod
    cons = driver.issue(TLBI_ALL, encode_command(CmdOpcode.TLBI_NH_ASID, asid=1),
                        encode_command(CmdOpcode.CFGI_CD_ALL, sid=4), TLBI_ALL)
    assert driver.cmdq.pointer(cons) == driver.cmdq.increment(start, 2)
    assert driver.cmdq_cons_error() == CError.ILL
    # The whole batch (up to the SYNC) was offered; no SYNC reached the sink.
    assert sink.calls == [("invalidate", [CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ASID,
                                          CmdOpcode.CFGI_CD_ALL, CmdOpcode.TLBI_NH_ALL])]


def test_sink_refusing_ste_is_cerror_ill_at_cfgi_ste(driver: GuestDriver, smmu: SmmuV3,
                                                     sink: RecordingConfigSink) -> None:
    sink.reject_sids = {0x21}
    start = driver.cmdq_prod
    cons = driver.issue(encode_command(CmdOpcode.CFGI_STE, sid=0x20),
                        encode_command(CmdOpcode.CFGI_STE, sid=0x21))
    assert driver.cmdq.pointer(cons) == driver.cmdq.increment(start, 1)
    assert driver.cmdq_cons_error() == CError.ILL
    assert sink.calls == [("ste_changed", 0x20, 0x20), ("ste_changed", 0x21, 0x21)]


@pytest.mark.parametrize("command", [
    encode_command(CmdOpcode.TLBI_S2_IPA, vmid=1, address=0x1000),
    encode_command(CmdOpcode.TLBI_S12_VMALL, vmid=1),
    encode_command(CmdOpcode.TLBI_EL2_ALL),
    encode_command(CmdOpcode.TLBI_EL3_ALL),
    encode_command(CmdOpcode.PRI_RESP, sid=1),
    encode_command(CmdOpcode.ATC_INV, sid=1),
    encode_command(CmdOpcode.CFGI_STE, sid=1, ssec=1),
    encode_command(CmdOpcode.SYNC, cs=3),
], ids=["S2_IPA", "S12_VMALL", "EL2_ALL", "EL3_ALL", "PRI_RESP", "ATC_INV-no-ATS", "SSec",
        "SYNC-CS3"])
def test_commands_for_unadvertised_features_are_ill(driver: GuestDriver, command: bytes) -> None:
    start = driver.cmdq_prod
    cons = driver.issue(command, sync=False)
    assert driver.cmdq.pointer(cons) == start
    assert driver.cmdq_cons_error() == CError.ILL


def test_atc_inv_is_batched_when_ats_advertised(ram, sink) -> None:  # type: ignore[no-untyped-def]
    smmu = SmmuV3(ram, sink, SmmuFeatures(ats=True))
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    sink.calls.clear()
    drv.issue(encode_command(CmdOpcode.ATC_INV, sid=1, size=52))
    assert sink.calls == [("invalidate", [CmdOpcode.ATC_INV]), ("sync",)]


def test_prefetch_resume_stall_term_are_consumed_as_noops(driver: GuestDriver,
                                                          sink: RecordingConfigSink) -> None:
    cons = driver.issue(encode_command(CmdOpcode.PREFETCH_CONFIG, sid=1),
                        encode_command(CmdOpcode.RESUME, sid=1),
                        encode_command(CmdOpcode.STALL_TERM, sid=1), sync=False)
    assert driver.cmdq.pointer(cons) == driver.cmdq_prod
    assert driver.cmdq_cons_error() == CError.NONE and sink.calls == []


def test_cfgi_ste_range_and_out_of_range_sid(driver: GuestDriver,
                                             sink: RecordingConfigSink) -> None:
    driver.issue(encode_command(CmdOpcode.CFGI_STE_RANGE, sid=0x1234, range=3),
                 encode_command(CmdOpcode.CFGI_STE, sid=1 << 16), sync=False)
    assert sink.calls == [("ste_changed", 0x1230, 0x123F)]


def test_fetch_outside_guest_ram_is_cerror_abt(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) & ~CR0.CMDQEN.inplace_mask)
    far = driver.ram.base + driver.ram.size + 0x10000
    driver.write64(Reg.CMDQ_BASE, far | QUEUE_BASE.LOG2SIZE.place(4))
    driver.write32(Reg.CMDQ_PROD, 0)
    driver.write32(Reg.CMDQ_CONS, 0)
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) | CR0.CMDQEN.place(1))
    driver.write32(Reg.CMDQ_PROD, 2)
    assert driver.cmdq_cons_error() == CError.ABT
    assert driver.cmdq.pointer(smmu.read(Reg.CMDQ_CONS, 4)) == 0
    assert cmdq_err_active(smmu) and smmu.irq.level


def test_fetch_abort_mid_queue_hands_over_the_readable_commands(
        ram, sink) -> None:  # type: ignore[no-untyped-def]
    smmu = SmmuV3(ram, sink)
    last_slot = ram.base + ram.size - 2 * 16
    smmu.write(Reg.CMDQ_BASE, 8, last_slot | QUEUE_BASE.LOG2SIZE.place(3))
    ram.write(last_slot, TLBI_ALL + TLBI_ALL)
    smmu.write(Reg.CR0, 4, CR0.CMDQEN.place(1))
    smmu.write(Reg.CMDQ_PROD, 4, 3)
    assert sink.calls == [("invalidate", [CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ALL])]
    assert QueueIndex(3).pointer(smmu.read(Reg.CMDQ_CONS, 4)) == 2
    assert smmu.cmdq_error() is CError.ABT


def test_queue_not_consumed_until_cmdqen(ram, sink) -> None:  # type: ignore[no-untyped-def]
    smmu = SmmuV3(ram, sink)
    smmu.write(Reg.CMDQ_BASE, 8, ram.base | QUEUE_BASE.LOG2SIZE.place(3))
    ram.write(ram.base, TLBI_ALL)
    smmu.write(Reg.CMDQ_PROD, 4, 1)
    assert smmu.read(Reg.CMDQ_CONS, 4) == 0 and sink.calls == []
    smmu.write(Reg.CR0, 4, CR0.CMDQEN.place(1))
    assert smmu.read(Reg.CMDQ_CONS, 4) == 1
    assert sink.calls == [("invalidate", [CmdOpcode.TLBI_NH_ALL])]
    assert smmu.commands_consumed == 1


def test_trace_mode_logs_registers_and_commands_by_name(driver: GuestDriver, smmu: SmmuV3,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    smmu.trace = True
    with caplog.at_level("INFO", logger="vsmmu.smmu.device"):
        driver.issue(encode_command(CmdOpcode.CFGI_STE, sid=5))
    text = caplog.text
    assert "write CMDQ_PROD/4" in text and "read  CMDQ_CONS/4" in text
    assert "CFGI_STE(sid=0x5)" in text and "SYNC(cs=0x2)" in text
