"""Register file: reset values, GBPA update, GERROR toggles, access widths, RAZ/WI, reset."""

from __future__ import annotations

import pytest

from vsmmu.arch import CmdOpcode, encode_command
from vsmmu.arch.registers import (
    CR0,
    GBPA,
    GERROR,
    IRQ_CTRL,
    REGISTER_SPACE_SIZE,
    RESET_VALUES,
    SHCFG,
    STRTAB_BASE,
    Reg,
)
from vsmmu.smmu import GbpaState, GuestRam, IrqLine, RecordingConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver


def test_reset_values_and_id_registers(smmu: SmmuV3, features: SmmuFeatures) -> None:
    for reg, value in features.id_registers().items():
        assert smmu.read(reg, 4) == value
    assert smmu.read(Reg.GBPA, 4) == RESET_VALUES[Reg.GBPA] == GBPA.SHCFG.place(
        SHCFG.USE_INCOMING)
    for reg in (Reg.CR0, Reg.CR0ACK, Reg.IRQ_CTRL, Reg.GERROR, Reg.GERRORN, Reg.CMDQ_PROD,
                Reg.CMDQ_CONS, Reg.EVENTQ_PROD, Reg.EVENTQ_CONS, Reg.STATUSR):
        assert smmu.read(reg, 4) == 0


def test_gbpa_update_protocol(smmu: SmmuV3, sink: RecordingConfigSink) -> None:
    # Without UPDATE the write is ignored.
    smmu.write(Reg.GBPA, 4, GBPA.ABORT.place(1))
    assert smmu.read(Reg.GBPA, 4) == RESET_VALUES[Reg.GBPA] and sink.calls == []
    # With UPDATE the new attributes apply and UPDATE reads back clear at once.
    value = GBPA.ABORT.place(1) | GBPA.SHCFG.place(SHCFG.INNER_SHAREABLE)
    smmu.write(Reg.GBPA, 4, value | GBPA.UPDATE.place(1))
    assert smmu.read(Reg.GBPA, 4) == value
    assert sink.calls == [("gbpa_changed", GbpaState(abort=True, raw=value))]
    assert smmu.gbpa_state().abort


def test_64bit_register_by_halves_and_whole(smmu: SmmuV3) -> None:
    address = 0x12_3456_7800 | STRTAB_BASE.RA.place(1)
    smmu.write(Reg.STRTAB_BASE, 4, address & 0xFFFF_FFFF)
    smmu.write(Reg.STRTAB_BASE + 4, 4, address >> 32)
    assert smmu.read(Reg.STRTAB_BASE, 8) == address
    assert smmu.read(Reg.STRTAB_BASE + 4, 4) == address >> 32
    # RES0 bits are dropped.
    smmu.write(Reg.STRTAB_BASE, 8, address | 0x3F)
    assert smmu.read(Reg.STRTAB_BASE, 8) == address


def test_64bit_access_to_a_32bit_pair(smmu: SmmuV3) -> None:
    smmu.write(Reg.CR1, 8, (0x5 << 32) | 0xD75)
    assert smmu.read(Reg.CR1, 4) == 0xD75 and smmu.read(Reg.CR2, 4) == 0x5
    assert smmu.read(Reg.CR1, 8) == (0x5 << 32) | 0xD75


@pytest.mark.parametrize(("offset", "size"), [
    (0x30, 4), (0x8000, 8), (0x10000, 4), (Reg.CR0 + 1, 4), (Reg.CR0, 2), (Reg.CR0, 1),
    (REGISTER_SPACE_SIZE, 4), (REGISTER_SPACE_SIZE - 4, 8), (-4, 4),
])
def test_unknown_or_malformed_accesses_are_raz_wi(smmu: SmmuV3, offset: int, size: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vsmmu.smmu.device"):
        smmu.write(offset, size, 0xFFFF_FFFF)
        assert smmu.read(offset, size) == 0
    assert caplog.records
    assert smmu.read(Reg.CR0, 4) == 0


def test_read_only_registers_ignore_writes(smmu: SmmuV3, features: SmmuFeatures) -> None:
    smmu.write(Reg.IDR0, 4, 0)
    smmu.write(Reg.CR0ACK, 4, CR0.SMMUEN.place(1))
    smmu.write(Reg.GERROR, 4, GERROR.CMDQ_ERR.place(1))
    assert smmu.read(Reg.IDR0, 4) == features.id_registers()[Reg.IDR0]
    assert smmu.read(Reg.CR0ACK, 4) == 0 and smmu.read(Reg.GERROR, 4) == 0


def test_gerrorn_acknowledges_and_drops_irq(driver: GuestDriver, smmu: SmmuV3) -> None:
    bad = (0x7F).to_bytes(16, "little")
    sync = encode_command(CmdOpcode.SYNC)
    driver.issue(bad, sync=False)
    assert smmu.irq.level
    gerror = smmu.read(Reg.GERROR, 4)
    assert GERROR.CMDQ_ERR.test(gerror ^ smmu.read(Reg.GERRORN, 4))
    driver.replace_command(driver.cmdq_cons_pointer(), sync)
    smmu.write(Reg.GERRORN, 4, gerror)
    assert not smmu.irq.level
    assert driver.cmdq_cons_pointer() == driver.cmdq_prod
    # A second error toggles GERROR back: active again although the bit now reads 0.
    driver.issue(bad, sync=False)
    assert not GERROR.CMDQ_ERR.test(smmu.read(Reg.GERROR, 4))
    assert GERROR.CMDQ_ERR.test(smmu.read(Reg.GERROR, 4) ^ smmu.read(Reg.GERRORN, 4))
    assert smmu.irq.level


def test_ack_without_fixing_the_command_fails_again(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.issue((0x7F).to_bytes(16, "little"), sync=False)
    failing = driver.cmdq_cons_pointer()
    driver.acknowledge_gerror()
    assert driver.cmdq_cons_pointer() == failing
    assert GERROR.CMDQ_ERR.test(smmu.read(Reg.GERROR, 4) ^ smmu.read(Reg.GERRORN, 4))


def test_irq_ctrl_is_acknowledged_and_gates_gerror_irq(driver: GuestDriver,
                                                       smmu: SmmuV3) -> None:
    driver.write32(Reg.IRQ_CTRL, 0)
    assert smmu.read(Reg.IRQ_CTRLACK, 4) == 0
    driver.issue((0x7F).to_bytes(16, "little"), sync=False)
    assert not smmu.irq.level
    driver.write32(Reg.IRQ_CTRL, IRQ_CTRL.GERROR_IRQEN.place(1))
    assert smmu.irq.level


def test_base_registers_locked_while_enabled(driver: GuestDriver, smmu: SmmuV3) -> None:
    before = (smmu.read(Reg.STRTAB_BASE, 8), smmu.read(Reg.CMDQ_BASE, 8),
              smmu.read(Reg.EVENTQ_BASE, 8), smmu.read(Reg.CMDQ_CONS, 4))
    smmu.write(Reg.STRTAB_BASE, 8, 0)
    smmu.write(Reg.CMDQ_BASE, 8, 0)
    smmu.write(Reg.EVENTQ_BASE, 8, 0)
    smmu.write(Reg.CMDQ_CONS, 4, 0)
    assert before == (smmu.read(Reg.STRTAB_BASE, 8), smmu.read(Reg.CMDQ_BASE, 8),
                      smmu.read(Reg.EVENTQ_BASE, 8), smmu.read(Reg.CMDQ_CONS, 4))


def test_smmuen_clear_tells_the_sink(driver: GuestDriver, smmu: SmmuV3,
                                     sink: RecordingConfigSink) -> None:
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) & ~CR0.SMMUEN.inplace_mask)
    assert sink.calls == [("smmu_enable_changed", False, smmu.stream_table())]
    assert not smmu.enabled


def test_device_reset(driver: GuestDriver, smmu: SmmuV3, sink: RecordingConfigSink) -> None:
    driver.issue((0x7F).to_bytes(16, "little"), sync=False)
    assert smmu.irq.level
    smmu.reset()
    assert sink.calls[-1] == ("reset",)
    assert not smmu.irq.level
    for reg in (Reg.CR0, Reg.CR0ACK, Reg.GERROR, Reg.CMDQ_CONS, Reg.STRTAB_BASE):
        assert smmu.read(reg, 4) == RESET_VALUES[reg]
    # The driver can bring it up again.
    sink.calls.clear()
    driver.reset()
    assert driver.issue(encode_command(CmdOpcode.TLBI_NH_ALL)) == driver.cmdq_prod


def test_irq_listener_sees_edges_only(ram: GuestRam) -> None:
    levels: list[bool] = []
    line = IrqLine("test", levels.append)
    smmu = SmmuV3(ram, irq=line)
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    drv.issue((0x7F).to_bytes(16, "little"), sync=False)
    drv.issue(encode_command(CmdOpcode.TLBI_NH_ALL), sync=False)
    drv.replace_command(drv.cmdq_cons_pointer(), encode_command(CmdOpcode.SYNC))
    drv.acknowledge_gerror()
    assert drv.cmdq_cons_pointer() == drv.cmdq_prod
    assert levels[-2:] == [True, False]
    assert levels.count(True) == 1
