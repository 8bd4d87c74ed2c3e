"""What the command-queue loop needs besides the model's state.

How it treats each command (its kind by opcode and SSec, declared once from
the features the SMMU advertises: a command absent from :func:`command_kinds`
is CERROR_ILL) and how it reads commands from guest memory.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from vsmmu.arch.commands import CMD, COMMAND_SIZE, CError, CmdOpcode, Command
from vsmmu.smmu.features import SmmuFeatures
from vsmmu.smmu.interfaces import GuestMemory, GuestMemoryError

logger = logging.getLogger(__name__)

CommandErrorHandler = Callable[[CError, int, Command | None], None]
"""Hears the command queue stop: (CERROR, failing command's index, command or None)."""


class CommandKind(enum.IntEnum):
    """What the loop does with a command."""

    BATCH = 0
    """An invalidation: handed to the sink in a batch."""
    CFGI_STE = 1
    CFGI_STE_RANGE = 2
    SYNC = 3
    NOP = 4
    """Accepted and ignored (nothing is prefetched, nothing stalls)."""


KIND_KEY_MASK = CMD.OPCODE.inplace_mask | CMD.SSEC.inplace_mask
"""``dw0 & KIND_KEY_MASK`` is the key of :func:`command_kinds`."""
SSEC_OPCODES = frozenset({
    CmdOpcode.PREFETCH_CONFIG, CmdOpcode.PREFETCH_ADDR, CmdOpcode.CFGI_STE,
    CmdOpcode.CFGI_STE_RANGE, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL, CmdOpcode.RESUME,
    CmdOpcode.STALL_TERM,
})
"""Commands with an SSec field (SSec=1 on them is CERROR_ILL: no secure side)."""
BATCHABLE_OPCODES = frozenset({
    CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL, CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ASID,
    CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA, CmdOpcode.TLBI_NSNH_ALL, CmdOpcode.ATC_INV,
})
"""Commands delivered to :meth:`ConfigSink.invalidate` in batches."""


def command_kinds(features: SmmuFeatures) -> dict[int, int]:
    """Command kind by ``dw0 & KIND_KEY_MASK`` (opcode and SSEC); absent = CERROR_ILL."""
    kinds: dict[int, int] = {op: CommandKind.BATCH for op in BATCHABLE_OPCODES}
    if not features.ats:
        del kinds[CmdOpcode.ATC_INV]
    kinds.update({CmdOpcode.CFGI_STE: CommandKind.CFGI_STE,
                  CmdOpcode.CFGI_STE_RANGE: CommandKind.CFGI_STE_RANGE,
                  CmdOpcode.SYNC: CommandKind.SYNC, CmdOpcode.PREFETCH_CONFIG: CommandKind.NOP,
                  CmdOpcode.PREFETCH_ADDR: CommandKind.NOP, CmdOpcode.RESUME: CommandKind.NOP,
                  CmdOpcode.STALL_TERM: CommandKind.NOP})
    table: dict[int, int] = {}
    for op, kind in kinds.items():
        table[int(op)] = int(kind)
        if op not in SSEC_OPCODES:
            # Commands without an SSec field ignore bit 10 (it is RES0 for them).
            table[int(op) | CMD.SSEC.inplace_mask] = int(kind)
    return table


def fetch_commands(memory: GuestMemory, address: int, count: int, name: str) -> bytes:
    """Read up to ``count`` commands; a short result means the next one is unreadable."""
    try:
        return memory.read(address, count * COMMAND_SIZE)
    except GuestMemoryError:
        pass
    readable = bytearray()
    for i in range(count):
        try:
            readable += memory.read(address + i * COMMAND_SIZE, COMMAND_SIZE)
        except GuestMemoryError as exc:
            logger.info("%s: command fetch abort: %s", name, exc)
            break
    return bytes(readable)
