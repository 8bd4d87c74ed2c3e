"""Replay of the Linux arm-smmu-v3 probe/reset sequence and everyday operations."""

from __future__ import annotations

from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.cd import Cd
from vsmmu.arch.commands import TlbiTg
from vsmmu.arch.registers import CR0, GBPA, IRQ_CTRL, QUEUE_BASE, Reg, StrtabFmt
from vsmmu.smmu import GuestRam, RecordingConfigSink, SmmuV3, SteStatus, StreamTableConfig
from vsmmu.smmu.guest_driver import LINUX_CR1, LINUX_CR2, LINUX_STRTAB_SPLIT, GuestDriver


def test_probe_and_reset_sequence(smmu: SmmuV3, ram: GuestRam,
                                  sink: RecordingConfigSink) -> None:
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    # Exactly what the sink saw: CFGI_ALL + SYNC, TLBI_NSNH_ALL + SYNC, then SMMUEN.
    table = StreamTableConfig(base=drv.strtab_base, fmt=StrtabFmt.TWO_LEVEL, log2size=16,
                              split=LINUX_STRTAB_SPLIT)
    assert sink.calls == [
        ("ste_changed", 0, (1 << 16) - 1),
        ("sync",),
        ("invalidate", [CmdOpcode.TLBI_NSNH_ALL]),
        ("sync",),
        ("smmu_enable_changed", True, table),
    ]
    enables = CR0.SMMUEN.place(1) | CR0.EVENTQEN.place(1) | CR0.CMDQEN.place(1)
    assert smmu.read(Reg.CR0, 4) == enables == smmu.read(Reg.CR0ACK, 4)
    assert smmu.read(Reg.CR1, 4) == LINUX_CR1 and smmu.read(Reg.CR2, 4) == LINUX_CR2
    irqs = IRQ_CTRL.EVENTQ_IRQEN.place(1) | IRQ_CTRL.GERROR_IRQEN.place(1)
    assert smmu.read(Reg.IRQ_CTRLACK, 4) == irqs
    # Two commands + two syncs consumed, no error, nothing pending.
    assert drv.cmdq_cons_pointer() == drv.cmdq_prod == 4
    assert drv.cmdq_cons_error() == 0
    assert smmu.read(Reg.GERROR, 4) == smmu.read(Reg.GERRORN, 4) == 0
    assert smmu.read(Reg.CMDQ_BASE, 8) == QUEUE_BASE.RA_WA.place(1) | drv.cmdq_base | 8
    assert not smmu.irq.level


def test_reset_of_a_running_smmu_aborts_via_gbpa_first(driver: GuestDriver, smmu: SmmuV3,
                                                        sink: RecordingConfigSink) -> None:
    # Linux: if SMMUEN is set at probe, it sets GBPA.ABORT before disabling.
    value = driver.update_gbpa(GBPA.ABORT.place(1), 0)
    assert GBPA.ABORT.test(value)
    driver.reset()
    assert [c[0] for c in sink.calls] == ["gbpa_changed", "smmu_enable_changed",
                                          "ste_changed", "sync", "invalidate", "sync",
                                          "smmu_enable_changed"]
    assert sink.calls[1][1] is False and sink.calls[-1][1] is True


def test_write_ste_then_cfgi_ste_and_sync(driver: GuestDriver, smmu: SmmuV3,
                                          sink: RecordingConfigSink) -> None:
    ste = Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=driver.ram.base + 0x8_0000,
              s1dss=0)
    driver.write_ste(0x123, ste)
    assert sink.calls == [("ste_changed", 0x123, 0x123), ("sync",)]
    found = smmu.lookup_ste(0x123)
    assert found.status is SteStatus.VALID and found.ste == ste
    assert found.address == driver.ste_address(0x123)


def test_cd_update_and_tlbi_ranges_are_one_batch(driver: GuestDriver, smmu: SmmuV3,
                                                 sink: RecordingConfigSink) -> None:
    cd_address = driver.ram.base + 0x8_0000
    driver.ram.write(cd_address, Cd(v=1, aa64=1, t0sz=16, epd1=1, asid=7).encode())
    cons = driver.issue(
        encode_command(CmdOpcode.CFGI_CD, sid=0x123, ssid=0, leaf=1),
        encode_command(CmdOpcode.TLBI_NH_VA, asid=7, tg=TlbiTg.GRANULE_4K, num=3, scale=0,
                       address=0x1000, leaf=1),
        encode_command(CmdOpcode.TLBI_NH_VA, asid=7, tg=TlbiTg.GRANULE_4K, num=0, scale=2,
                       address=0x8000),
        encode_command(CmdOpcode.TLBI_NH_ASID, asid=7),
    )
    # Polling CONS after the SYNC: all five consumed in one PROD write.
    assert driver.cmdq.pointer(cons) == driver.cmdq_prod
    assert sink.calls == [("invalidate", [CmdOpcode.CFGI_CD, CmdOpcode.TLBI_NH_VA,
                                          CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_ASID]),
                          ("sync",)]


def test_invalidation_batch_carries_raw_command_words(driver: GuestDriver, smmu: SmmuV3) -> None:
    seen: list[tuple[int, int]] = []

    class Sink(RecordingConfigSink):
        def invalidate(self, batch):  # type: ignore[no-untyped-def]
            seen.extend((c.dw0, c.dw1) for c in batch)
            return len(batch)

    smmu.sink = Sink()
    raw = encode_command(CmdOpcode.TLBI_NH_VAA, vmid=0, address=0x7000, leaf=1)
    driver.issue(raw)
    assert seen == [(int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))]
