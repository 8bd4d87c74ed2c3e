"""The command loop's opcode/SSec dispatch table agrees with the architecture's rules.

The loop looks a command's kind up by opcode and SSec bit in one dict; this
checks every opcode with SSec clear and set, and CMD_SYNC with every CS,
against the rules written out by name: a command the model does not
implement, or SSec=1 on a command that has an SSec field, is CERROR_ILL at
exactly that command; SSec is ignored on commands without the field.
"""

from __future__ import annotations

import struct

from vsmmu.arch.commands import CMD, CError, CmdOpcode, SyncCs
from vsmmu.arch.registers import GERROR
from vsmmu.smmu import GuestRam, RecordingConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
IMPLEMENTED = {
    CmdOpcode.PREFETCH_CONFIG, CmdOpcode.PREFETCH_ADDR, CmdOpcode.CFGI_STE,
    CmdOpcode.CFGI_STE_RANGE, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL, CmdOpcode.TLBI_NH_ALL,
    CmdOpcode.TLBI_NH_ASID, CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA,
    CmdOpcode.TLBI_NSNH_ALL, CmdOpcode.RESUME, CmdOpcode.STALL_TERM, CmdOpcode.SYNC,
}
"""Without ATS (ATC_INV then needs IDR0.ATS)."""
WITH_SSEC_FIELD = {
    CmdOpcode.PREFETCH_CONFIG, CmdOpcode.PREFETCH_ADDR, CmdOpcode.CFGI_STE,
    CmdOpcode.CFGI_STE_RANGE, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL, CmdOpcode.RESUME,
    CmdOpcode.STALL_TERM,
}


def expected_error(opcode: int, ssec: int, cs: int) -> CError:
    if opcode not in IMPLEMENTED:
        return CError.ILL
    if ssec and opcode in WITH_SSEC_FIELD:
        return CError.ILL
    if opcode == CmdOpcode.SYNC and cs not in {int(c) for c in SyncCs}:
        return CError.ILL
    return CError.NONE


def test_dispatch_of_every_opcode_with_and_without_ssec() -> None:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    smmu = SmmuV3(ram, RecordingConfigSink(), SmmuFeatures())
    driver = GuestDriver(smmu, ram)
    driver.probe()
    driver.reset()
    cases = [(op, ssec, 0) for op in range(CMD.OPCODE.mask + 1) for ssec in (0, 1)]
    cases += [(CmdOpcode.SYNC, ssec, cs) for cs in range(1, CMD.SYNC_CS.mask + 1)
              for ssec in (0, 1)]
    for opcode, ssec, cs in cases:
        start = driver.cmdq_prod
        dw0 = CMD.OPCODE.place(opcode) | CMD.SSEC.place(ssec)
        if opcode == CmdOpcode.SYNC:
            dw0 |= CMD.SYNC_CS.place(cs)
        cons = driver.issue(struct.pack("<QQ", dw0, 0), sync=False)
        error = expected_error(opcode, ssec, cs)
        case = f"opcode {opcode:#04x} SSec={ssec} CS={cs}"
        if error is CError.NONE:
            assert driver.cmdq.pointer(cons) == driver.cmdq_prod, case
            assert not GERROR.CMDQ_ERR.test(smmu.active_errors()), case
        else:
            assert driver.cmdq.pointer(cons) == start, case
            assert driver.cmdq_cons_error() == error, case
            # Linux's recovery: the bad command becomes a SYNC, GERRORN acknowledges.
            driver.replace_command(start, struct.pack("<QQ", CMD.OPCODE.place(CmdOpcode.SYNC), 0))
            assert GERROR.CMDQ_ERR.test(driver.acknowledge_gerror()), case
            assert driver.cmdq_cons_pointer() == driver.cmdq_prod, case


def test_batched_commands_keep_their_opcode_names() -> None:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    sink = RecordingConfigSink()
    smmu = SmmuV3(ram, sink, SmmuFeatures())
    driver = GuestDriver(smmu, ram)
    driver.probe()
    driver.reset()
    sink.calls.clear()
    driver.issue(*(struct.pack("<QQ", CMD.OPCODE.place(op), 0)
                   for op in (CmdOpcode.TLBI_NH_VA, CmdOpcode.CFGI_CD_ALL)))
    (name, opcodes), sync = sink.calls
    assert name == "invalidate" and sync == ("sync",)
    assert [op.name for op in opcodes] == ["TLBI_NH_VA", "CFGI_CD_ALL"]  # type: ignore[attr-defined]
