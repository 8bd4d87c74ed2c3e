"""Command queue entries: opcodes, formats, CERROR codes.

Source: Arm IHI 0070 chapter 4 "Commands" (§4.1 command format, §4.2
prefetch, §4.3 configuration invalidation, §4.4 TLB invalidation, §4.5 ATC
invalidation, §4.6 PRI, §4.7 stall, §4.8 CMD_SYNC) and §7.1 "Command queue
errors" (CERROR codes).  A command is 16 bytes: two little-endian 64-bit
double words, the opcode in ``dw0[7:0]``.

Two ways in:

* the **fast path** for the device model's command loop: the :class:`CMD`
  namespace of precomputed :class:`~vsmmu.arch.fields.Field` objects applied
  to the raw double words (``CMD.OPCODE.get(dw0)``, ``CMD.SID.get(dw0)``);
* the **documentation path**: :func:`decode_command` / :func:`encode_command`
  and :class:`Command`, which print by name
  (``CFGI_STE(sid=0x10, leaf=1)``).

``CMD_CFGI_ALL`` is not an opcode of its own: it is ``CMD_CFGI_STE_RANGE``
with ``Range = 31`` (IHI 0070 §4.3.3).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping

from vsmmu.arch.fields import ArchError, Field, RecordLayout, bytes_from_words, words_from_bytes

logger = logging.getLogger(__name__)

COMMAND_SIZE = 16
CFGI_ALL_RANGE = 31
"""CMD_CFGI_STE_RANGE.Range value that makes it CMD_CFGI_ALL."""


class CmdOpcode(enum.IntEnum):
    """Command opcodes (IHI 0070 chapter 4, table "Command opcodes")."""

    PREFETCH_CONFIG = 0x01
    PREFETCH_ADDR = 0x02
    CFGI_STE = 0x03
    CFGI_STE_RANGE = 0x04
    CFGI_CD = 0x05
    CFGI_CD_ALL = 0x06
    CFGI_VMS_PIDM = 0x07
    TLBI_NH_ALL = 0x10
    TLBI_NH_ASID = 0x11
    TLBI_NH_VA = 0x12
    TLBI_NH_VAA = 0x13
    TLBI_EL3_ALL = 0x18
    TLBI_EL3_VA = 0x1A
    TLBI_EL2_ALL = 0x20
    TLBI_EL2_ASID = 0x21
    TLBI_EL2_VA = 0x22
    TLBI_EL2_VAA = 0x23
    TLBI_S12_VMALL = 0x28
    TLBI_S2_IPA = 0x2A
    TLBI_NSNH_ALL = 0x30
    ATC_INV = 0x40
    PRI_RESP = 0x41
    RESUME = 0x44
    STALL_TERM = 0x45
    SYNC = 0x46


class CError(enum.IntEnum):
    """SMMU_CMDQ_CONS.ERR codes (IHI 0070 §7.1)."""

    NONE = 0x00
    ILL = 0x01
    ABT = 0x02
    ATC_INV_SYNC = 0x03


class SyncCs(enum.IntEnum):
    """CMD_SYNC.CS: completion signal. 3 is reserved."""

    NONE = 0
    IRQ = 1
    SEV = 2


class ResumeAction(enum.IntEnum):
    """CMD_RESUME.Action: what to do with a stalled transaction."""

    TERMINATE = 0
    RETRY = 1
    ABORT = 2


class PriResp(enum.IntEnum):
    """CMD_PRI_RESP.Resp: PRI response code."""

    DENY = 0
    FAIL = 1
    SUCCESS = 2


class TlbiTg(enum.IntEnum):
    """TLBI_*_VA/IPA.TG: range-invalidation granule; 0 means a single address."""

    NONE = 0
    GRANULE_4K = 1
    GRANULE_16K = 2
    GRANULE_64K = 3


TLBI_TG_PAGE_SHIFT: dict[int, int] = {TlbiTg.GRANULE_4K: 12, TlbiTg.GRANULE_16K: 14,
                                      TlbiTg.GRANULE_64K: 16}
"""TLBI TG encoding -> page shift of the range granule."""


class CMD:
    """Command fields, shared across the formats that use them (IHI 0070 chapter 4)."""

    OPCODE = Field("opcode", 7, 0)
    ATC_GLOBAL = Field("global", 9, 9)
    SSEC = Field("ssec", 10, 10)
    SSV = Field("ssv", 11, 11)
    SSID = Field("ssid", 31, 12)
    SID = Field("sid", 63, 32)
    NUM = Field("num", 16, 12)
    SCALE = Field("scale", 24, 20)
    VMID = Field("vmid", 47, 32)
    ASID = Field("asid", 63, 48)
    RESUME_ACTION = Field("action", 13, 12)
    SYNC_CS = Field("cs", 13, 12)
    SYNC_MSH = Field("msh", 23, 22)
    SYNC_MSIATTR = Field("msiattr", 27, 24)
    SYNC_MSIDATA = Field("msidata", 63, 32)
    LEAF = Field("leaf", 0, 0, word=1)
    RANGE = Field("range", 4, 0, word=1)
    TTL = Field("ttl", 9, 8, word=1)
    TG = Field("tg", 11, 10, word=1)
    VA = Field("address", 63, 12, word=1, address=True)
    IPA = Field("address", 51, 12, word=1, address=True)
    ATC_SIZE = Field("size", 5, 0, word=1)
    PREFETCH_SIZE = Field("size", 4, 0, word=1)
    PREFETCH_STRIDE = Field("stride", 9, 5, word=1)
    PRI_GRPID = Field("prgindex", 8, 0, word=1)
    PRI_RESP = Field("resp", 13, 12, word=1)
    RESUME_STAG = Field("stag", 15, 0, word=1)
    SYNC_MSIADDR = Field("msiaddr", 51, 2, word=1, address=True)


_RANGE_VA = (CMD.NUM, CMD.SCALE)
_VA_DW1 = (CMD.LEAF, CMD.TTL, CMD.TG, CMD.VA)

COMMAND_LAYOUTS: dict[CmdOpcode, RecordLayout] = {
    op: RecordLayout(op.name, COMMAND_SIZE, [CMD.OPCODE, *fields])
    for op, fields in {
        CmdOpcode.PREFETCH_CONFIG: (CMD.SSEC, CMD.SSV, CMD.SSID, CMD.SID),
        CmdOpcode.PREFETCH_ADDR: (CMD.SSEC, CMD.SSV, CMD.SSID, CMD.SID, CMD.PREFETCH_SIZE,
                                  CMD.PREFETCH_STRIDE, CMD.VA),
        CmdOpcode.CFGI_STE: (CMD.SSEC, CMD.SID, CMD.LEAF),
        CmdOpcode.CFGI_STE_RANGE: (CMD.SSEC, CMD.SID, CMD.RANGE),
        CmdOpcode.CFGI_CD: (CMD.SSEC, CMD.SSID, CMD.SID, CMD.LEAF),
        CmdOpcode.CFGI_CD_ALL: (CMD.SSEC, CMD.SID),
        CmdOpcode.CFGI_VMS_PIDM: (CMD.SSEC, CMD.VMID),
        CmdOpcode.TLBI_NH_ALL: (CMD.VMID,),
        CmdOpcode.TLBI_NH_ASID: (CMD.VMID, CMD.ASID),
        CmdOpcode.TLBI_NH_VA: (*_RANGE_VA, CMD.VMID, CMD.ASID, *_VA_DW1),
        CmdOpcode.TLBI_NH_VAA: (*_RANGE_VA, CMD.VMID, *_VA_DW1),
        CmdOpcode.TLBI_EL3_ALL: (),
        CmdOpcode.TLBI_EL3_VA: (*_RANGE_VA, *_VA_DW1),
        CmdOpcode.TLBI_EL2_ALL: (),
        CmdOpcode.TLBI_EL2_ASID: (CMD.ASID,),
        CmdOpcode.TLBI_EL2_VA: (*_RANGE_VA, CMD.ASID, *_VA_DW1),
        CmdOpcode.TLBI_EL2_VAA: (*_RANGE_VA, *_VA_DW1),
        CmdOpcode.TLBI_S12_VMALL: (CMD.VMID,),
        CmdOpcode.TLBI_S2_IPA: (*_RANGE_VA, CMD.VMID, CMD.LEAF, CMD.TTL, CMD.TG, CMD.IPA),
        CmdOpcode.TLBI_NSNH_ALL: (),
        CmdOpcode.ATC_INV: (CMD.ATC_GLOBAL, CMD.SSV, CMD.SSID, CMD.SID, CMD.ATC_SIZE, CMD.VA),
        CmdOpcode.PRI_RESP: (CMD.SSV, CMD.SSID, CMD.SID, CMD.PRI_GRPID, CMD.PRI_RESP),
        CmdOpcode.RESUME: (CMD.SSEC, CMD.RESUME_ACTION, CMD.SID, CMD.RESUME_STAG),
        CmdOpcode.STALL_TERM: (CMD.SSEC, CMD.SID),
        CmdOpcode.SYNC: (CMD.SYNC_CS, CMD.SYNC_MSH, CMD.SYNC_MSIATTR, CMD.SYNC_MSIDATA,
                         CMD.SYNC_MSIADDR),
    }.items()
}
"""Per-opcode field tables: ``COMMAND_LAYOUTS[op].decode(bytes)`` gives every field."""


def opcode_name(opcode: int) -> str:
    """The opcode's name, or ``UNKNOWN(0x..)`` for an opcode the architecture does not define."""
    try:
        return CmdOpcode(opcode).name
    except ValueError:
        return f"UNKNOWN({opcode:#04x})"


@dataclasses.dataclass(frozen=True)
class Command:
    """A decoded command: its opcode and every field of its format except the opcode."""

    opcode: int
    fields: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The opcode's name (``CFGI_STE``) or ``UNKNOWN(0x..)``."""
        return opcode_name(self.opcode)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v:#x}" for k, v in self.fields.items() if v)
        return f"{self.name}({args})"

    def encode(self) -> bytes:
        """Encode to 16 bytes. Raises ArchError for an unknown opcode or an ill-fitting field."""
        return encode_command(self.opcode, **self.fields)


def decode_command_words(dw0: int, dw1: int) -> Command:
    """Decode a command's two double words. An unknown opcode decodes with no fields."""
    opcode = CMD.OPCODE.get(dw0)
    try:
        layout = COMMAND_LAYOUTS[CmdOpcode(opcode)]
    except ValueError:
        return Command(opcode)
    values = layout.decode_words((dw0, dw1))
    del values["opcode"]
    return Command(CmdOpcode(opcode), values)


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode 16 little-endian bytes into a :class:`Command`."""
    dw0, dw1 = words_from_bytes(data, 2)
    return decode_command_words(dw0, dw1)


def encode_command_words(opcode: int, **fields: int) -> tuple[int, int]:
    """Encode a command into its two double words. Raises ArchError on unknown opcode/field."""
    try:
        layout = COMMAND_LAYOUTS[CmdOpcode(opcode)]
    except ValueError:
        raise ArchError(f"command opcode {opcode:#x} is not an SMMUv3 opcode") from None
    dw0, dw1 = layout.encode_words({"opcode": int(opcode), **fields})
    return dw0, dw1


def encode_command(opcode: int, **fields: int) -> bytes:
    """Encode a command into 16 little-endian bytes. Raises ArchError on unknown opcode/field."""
    return bytes_from_words(encode_command_words(opcode, **fields))


def encode_cfgi_all() -> bytes:
    """CMD_CFGI_ALL: CMD_CFGI_STE_RANGE with Range=31 (IHI 0070 §4.3.3)."""
    return encode_command(CmdOpcode.CFGI_STE_RANGE, range=CFGI_ALL_RANGE)


def cfgi_ste_range_sids(sid: int, range_: int) -> tuple[int, int]:
    """First and last StreamID invalidated by CMD_CFGI_STE_RANGE(SID, Range).

    The span is ``2**(Range+1)`` StreamIDs aligned to its size (IHI 0070 §4.3.3).
    """
    span = 1 << (range_ + 1)
    first = sid & ~(span - 1) & CMD.SID.mask
    return first, min(first + span - 1, CMD.SID.mask)


def tlbi_range_bytes(tg: int, num: int, scale: int) -> int:
    """Bytes invalidated by a range TLBI: ``(NUM+1) * 2**SCALE`` granules (IHI 0070 §4.4.1).

    Returns 0 for TG=0 (a single-address invalidation).
    """
    shift = TLBI_TG_PAGE_SHIFT.get(tg)
    if shift is None:
        return 0
    return (num + 1) << (scale + shift)
