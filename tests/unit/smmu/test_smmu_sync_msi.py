"""CMD_SYNC completion by MSI (IHI 0070 §4.7.3 CS=SIG_IRQ, IDR0.MSI) and the IRQ_CFG registers.

Linux with IDR0.MSI and coherent access (ARM_SMMU_OPT_MSIPOLL) puts the
address of the CMD_SYNC's own queue slot in MSIAddress with MSIData 0 and
polls that word until it reads zero, instead of reading CMDQ_CONS.
"""

from __future__ import annotations

import struct

import pytest

from vsmmu.arch import CmdOpcode, encode_command
from vsmmu.arch.commands import COMMAND_SIZE, SyncCs
from vsmmu.arch.registers import GERROR, IDR0, Reg
from vsmmu.smmu import GuestRam, RecordingConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

from .conftest import RAM_BASE, RAM_SIZE

TLBI_ALL = encode_command(CmdOpcode.TLBI_NH_ALL)
MSI_CMDQ_ABT_ERR = 1 << 4  # GERROR bit 4 (IHI 0070 §6.3.18)
CMDQ_ERR = 1 << 0


def msi_sync(address: int, data: int = 0) -> bytes:
    """CMD_SYNC with CS=SIG_IRQ (1) — encoded by hand from IHI 0070 §4.7.3."""
    dw0 = 0x46 | (1 << 12) | (data << 32)
    return struct.pack("<QQ", dw0, address)


def slot_address(driver: GuestDriver, pointer: int) -> int:
    return driver.cmdq_base + driver.cmdq.index(pointer) * COMMAND_SIZE


def active_errors(smmu: SmmuV3) -> int:
    return smmu.read(Reg.GERROR, 4) ^ smmu.read(Reg.GERRORN, 4)


def test_idr0_advertises_msi_with_coherent_access(smmu: SmmuV3) -> None:
    idr0 = smmu.read(Reg.IDR0, 4)
    assert idr0 >> 13 & 1 and idr0 >> 4 & 1  # MSI, COHACC


def test_sync_msi_zeroes_its_own_slot_as_linux_polls_it(driver: GuestDriver, ram: GuestRam,
                                                        smmu: SmmuV3) -> None:
    for _ in range(3):  # a few syncs, each polled on its own slot
        sync_slot = slot_address(driver, driver.cmdq.increment(driver.cmdq_prod, 2))
        before = driver.cmdq_prod
        for command in (TLBI_ALL, TLBI_ALL, msi_sync(sync_slot)):
            ram.write(slot_address(driver, driver.cmdq_prod), command)
            driver.cmdq_prod = driver.cmdq.increment(driver.cmdq_prod)
        assert struct.unpack("<I", ram.read(sync_slot, 4))[0] != 0
        driver.write32(Reg.CMDQ_PROD, driver.cmdq_prod)
        assert struct.unpack("<I", ram.read(sync_slot, 4))[0] == 0
        assert driver.cmdq_cons_pointer() == driver.cmdq.increment(before, 3)
    assert active_errors(smmu) == 0


def test_sync_msi_writes_msidata_after_the_commands_before_it(
        smmu: SmmuV3, driver: GuestDriver, ram: GuestRam, sink: RecordingConfigSink) -> None:
    target = RAM_BASE + 0x3000
    seen_at_invalidate: list[bytes] = []
    record = sink.invalidate

    def invalidate(batch):  # type: ignore[no-untyped-def]
        seen_at_invalidate.append(ram.read(target, 4))
        return record(batch)

    sink.invalidate = invalidate  # type: ignore[method-assign]
    driver.issue(TLBI_ALL, msi_sync(target, 0xCAFEF00D), sync=False)
    assert ram.read(target, 4) == (0xCAFEF00D).to_bytes(4, "little")
    assert seen_at_invalidate == [bytes(4)]  # the TLBI was handed over before the MSI
    assert smmu.sync_msis == 1


def test_sync_msi_outside_guest_ram_raises_msi_cmdq_abt_err_and_the_queue_goes_on(
        smmu: SmmuV3, driver: GuestDriver) -> None:
    start = driver.cmdq_prod
    cons = driver.issue(msi_sync(RAM_BASE + RAM_SIZE + 0x1000), TLBI_ALL, sync=False)
    assert driver.cmdq.pointer(cons) == driver.cmdq.increment(start, 2)
    errors = active_errors(smmu)
    assert errors & MSI_CMDQ_ABT_ERR and not errors & CMDQ_ERR
    assert GERROR.MSI_CMDQ_ABT_ERR.test(driver.acknowledge_gerror())
    assert active_errors(smmu) == 0


def test_sev_sync_writes_nothing(driver: GuestDriver, ram: GuestRam, smmu: SmmuV3) -> None:
    sync = encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)
    slot = slot_address(driver, driver.cmdq_prod)
    driver.issue(sync, sync=False)
    assert ram.read(slot, COMMAND_SIZE) == sync
    assert smmu.sync_msis == 0


@pytest.mark.parametrize("features", [SmmuFeatures(msi=False)])
def test_without_idr0_msi_a_sig_irq_sync_is_sig_none(driver: GuestDriver, ram: GuestRam,
                                                     smmu: SmmuV3) -> None:
    assert not IDR0.MSI.test(smmu.read(Reg.IDR0, 4))
    target = RAM_BASE + 0x3000
    ram.write(target, b"\xff" * 4)
    driver.issue(msi_sync(target), sync=False)
    assert ram.read(target, 4) == b"\xff" * 4
    assert smmu.read(Reg.GERROR_IRQ_CFG0, 8) == 0
    smmu.write(Reg.GERROR_IRQ_CFG0, 8, 0x1234_5678)
    assert smmu.read(Reg.GERROR_IRQ_CFG0, 8) == 0


def test_irq_cfg_registers_hold_what_the_guest_writes_until_reset(smmu: SmmuV3) -> None:
    writes = {Reg.GERROR_IRQ_CFG0: (8, 0xF_FFFF_FFFF_FFFF_FFFF, 0xF_FFFF_FFFF_FFFC),
              Reg.GERROR_IRQ_CFG1: (4, 0x1234_5678, 0x1234_5678),
              Reg.GERROR_IRQ_CFG2: (4, 0xFFFF_FFFF, 0x3F),
              Reg.EVENTQ_IRQ_CFG0: (8, 0x8_0000_1004, 0x8_0000_1004),
              Reg.EVENTQ_IRQ_CFG1: (4, 7, 7),
              Reg.EVENTQ_IRQ_CFG2: (4, 0x31, 0x31)}
    for reg, (size, value, _) in writes.items():
        smmu.write(reg, size, value)
    for reg, (size, _, expected) in writes.items():
        assert smmu.read(reg, size) == expected, reg.name
    smmu.reset()
    assert all(smmu.read(reg, size) == 0 for reg, (size, _, _) in writes.items())


def test_observer_sees_the_sync_before_its_msi_overwrites_the_slot(
        driver: GuestDriver, ram: GuestRam, smmu: SmmuV3) -> None:
    # An observer (the sanitizer) reads the consumed commands back from the queue; Linux's
    # MSI lands on the SYNC's own slot, so it must be stored after the observer looked.
    seen: list[int] = []

    class Observer:
        def commands_consumed(self, first: int, end: int) -> None:
            pointer = first
            while pointer != end:
                seen.append(int.from_bytes(ram.read(slot_address(driver, pointer), 1), "little"))
                pointer = driver.cmdq.increment(pointer)

        def event_queue_full(self, record: bytes) -> None:
            pass

        def reset(self) -> None:
            pass

    smmu.observer = Observer()  # type: ignore[assignment]
    sync_slot = slot_address(driver, driver.cmdq.increment(driver.cmdq_prod))
    driver.issue(TLBI_ALL, msi_sync(sync_slot), sync=False)
    assert seen == [CmdOpcode.TLBI_NH_ALL, CmdOpcode.SYNC]
    assert ram.read(sync_slot, 4) == bytes(4)
