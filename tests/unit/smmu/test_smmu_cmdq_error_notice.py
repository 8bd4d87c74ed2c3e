"""SmmuV3 tells its owner when the command queue stops: (CERROR, index, command).

The index is where CONS stopped (the failing command's slot), the command is
the one in that slot decoded, or None for a fetch abort; nothing is told for
a queue that runs clean, nor again while the error is not acknowledged.
"""

from __future__ import annotations

from vsmmu.arch import CError, CmdOpcode, encode_command
from vsmmu.arch.commands import Command, SyncCs, decode_command
from vsmmu.arch.registers import CR0, QUEUE_BASE, Reg
from vsmmu.smmu import GuestRam, RecordingConfigSink, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

TLBI_ALL = encode_command(CmdOpcode.TLBI_NH_ALL)
SYNC = encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)
BAD = (0x7F).to_bytes(16, "little")

Notice = tuple[CError, int, Command | None]


def rig(ram: GuestRam, sink: RecordingConfigSink) -> tuple[SmmuV3, GuestDriver, list[Notice]]:
    heard: list[Notice] = []
    smmu = SmmuV3(ram, sink, on_command_error=lambda e, i, c: heard.append((e, i, c)))
    driver = GuestDriver(smmu, ram)
    driver.probe()
    driver.reset()
    return smmu, driver, heard


def test_illegal_command_is_told_once_with_its_slot_and_words(
        ram: GuestRam, sink: RecordingConfigSink) -> None:
    _, driver, heard = rig(ram, sink)
    driver.issue(TLBI_ALL, sync=True)
    assert heard == []
    slot = driver.cmdq.index(driver.cmdq_prod) + 1  # after one good TLBI
    driver.issue(TLBI_ALL, BAD, TLBI_ALL, sync=False)
    assert heard == [(CError.ILL, slot, decode_command(BAD))]
    driver.issue(TLBI_ALL, sync=False)  # frozen: no second notice
    assert len(heard) == 1


def test_refused_invalidation_is_told_at_the_refused_command(
        ram: GuestRam, sink: RecordingConfigSink) -> None:
    _, driver, heard = rig(ram, sink)
    sink.fail_opcodes.add(CmdOpcode.TLBI_NH_ASID)
    first = driver.cmdq.index(driver.cmdq_prod)
    refused = encode_command(CmdOpcode.TLBI_NH_ASID, asid=5)
    driver.issue(TLBI_ALL, TLBI_ALL, refused, sync=True)
    assert heard == [(CError.ILL, first + 2, decode_command(refused))]


def test_fetch_abort_is_told_without_a_command(ram: GuestRam,
                                               sink: RecordingConfigSink) -> None:
    smmu, driver, heard = rig(ram, sink)
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) & ~CR0.CMDQEN.inplace_mask)
    driver.write64(Reg.CMDQ_BASE, (ram.base + ram.size + 0x10000) | QUEUE_BASE.LOG2SIZE.place(4))
    driver.write32(Reg.CMDQ_PROD, 0)
    driver.write32(Reg.CMDQ_CONS, 0)
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) | CR0.CMDQEN.place(1))
    driver.write32(Reg.CMDQ_PROD, 2)
    assert heard == [(CError.ABT, 0, None)]
