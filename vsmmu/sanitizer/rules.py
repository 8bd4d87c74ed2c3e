"""The architectural rules the sanitizer enforces, as pure functions of raw words.

Sources: Arm IHI 0070 §5.2 (which STE fields each Config uses), §5.4 (CD
fields, EPDx), §3.21 (structure updates: the SMMU may read an entry at any
time, 64 bits at a time, so a valid entry may only change in a way every
mix of old and new double words is one or the other), chapter 4 (command
formats: bits no field names are RES0).  Linux's arm_smmu_write_entry obeys
the §3.21 rule by writing, between CFGIs, the bits the current configuration
does not use, then the one double word that switches configuration, then the
rest ("hitless"), or by going through V=0 when more than one double word must
switch.  These functions are written from the architecture, not from Linux.
"""

from __future__ import annotations

from collections.abc import Sequence

from vsmmu.arch.cd import CD
from vsmmu.arch.commands import CMD, COMMAND_LAYOUTS, CmdOpcode
from vsmmu.arch.fields import Field
from vsmmu.arch.ste import STE, S1Dss, SteConfig

Words = Sequence[int]
"""An entry as little-endian 64-bit double words (8 for an STE or a CD)."""

ENTRY_DWORDS = 8

_STE_ATTRIBUTE_OVERRIDES = (STE.MTCFG, STE.MEMATTR, STE.ALLOCCFG, STE.SHCFG, STE.NSCFG,
                            STE.PRIVCFG, STE.INSTCFG)
"""§5.2: the attribute overrides that apply to a bypassed stream."""
_STE_S1 = (STE.S1FMT, STE.S1CONTEXTPTR, STE.S1CDMAX, STE.S1DSS, STE.S1CIR, STE.S1COR,
           STE.S1CSH, STE.S1STALLD, STE.STRW, STE.EATS, STE.S2VMID)
"""§5.2: what a stage-1 Config reads (the VMID tags its TLB entries)."""
_STE_S2 = (STE.EATS, STE.SHCFG, STE.S2VMID, STE.S2T0SZ, STE.S2SL0, STE.S2IR0, STE.S2OR0,
           STE.S2SH0, STE.S2TG, STE.S2PS, STE.S2AA64, STE.S2ENDI, STE.S2AFFD, STE.S2PTW,
           STE.S2HD, STE.S2HA, STE.S2S, STE.S2R, STE.S2TTB)
_STE_S1_BIT = 0b001
_STE_S2_BIT = 0b010
_TRANSLATING = frozenset({SteConfig.BYPASS, SteConfig.S1_TRANS, SteConfig.S2_TRANS,
                          SteConfig.NESTED})
"""Configs that let traffic through: the only ones a torn update can hurt."""

_CD_HALF0 = (CD.T0SZ, CD.TG0, CD.IR0, CD.OR0, CD.SH0, CD.NSCFG0, CD.HAD0, CD.TTB0)
_CD_HALF1 = (CD.T1SZ, CD.TG1, CD.IR1, CD.OR1, CD.SH1, CD.NSCFG1, CD.HAD1, CD.TTB1)
_CD_ALWAYS = tuple(f for f in CD.LAYOUT.fields.values()
                   if f not in _CD_HALF0 and f not in _CD_HALF1)


def _mask(fields: Sequence[Field]) -> list[int]:
    used = [0] * ENTRY_DWORDS
    for f in fields:
        used[f.word] |= f.inplace_mask
    return used


def ste_used_bits(words: Words) -> list[int]:
    """The bits of an STE the SMMU reads for its Config (IHI 0070 §5.2), per double word."""
    w0 = words[0]
    if not STE.V.test(w0):
        return _mask([STE.V])
    fields: list[Field] = [STE.V, STE.CONFIG]
    config = STE.CONFIG.get(w0)
    if config == SteConfig.BYPASS:
        fields += _STE_ATTRIBUTE_OVERRIDES
    elif config in _TRANSLATING:
        if config & _STE_S1_BIT:
            fields += _STE_S1
            if STE.S1DSS.get(words[1]) == S1Dss.BYPASS:
                fields.append(STE.SHCFG)
        if config & _STE_S2_BIT:
            fields += _STE_S2
    return _mask(fields)


def cd_used_bits(words: Words) -> list[int]:
    """The bits of a CD the SMMU reads (IHI 0070 §5.4): none but V when invalid; a half
    disabled by EPDx is not walked, so its TTBx and TCR fields are unused."""
    w0 = words[0]
    if not CD.V.test(w0):
        return _mask([CD.V])
    fields = list(_CD_ALWAYS)
    if not CD.EPD0.test(w0):
        fields += _CD_HALF0
    if not CD.EPD1.test(w0):
        fields += _CD_HALF1
    return _mask(fields)


def ste_lets_traffic_through(words: Words) -> bool:
    """V=1 and a Config that translates or bypasses (not abort, not reserved)."""
    return STE.V.test(words[0]) and STE.CONFIG.get(words[0]) in _TRANSLATING


def cd_valid(words: Words) -> bool:
    """CD.V=1."""
    return CD.V.test(words[0])


def used_differences(old: Words, new: Words, used_old: Words, used_new: Words) -> list[int]:
    """Indexes of the double words whose bits used by ``old`` or ``new`` differ."""
    return [i for i, (a, b) in enumerate(zip(old, new, strict=True))
            if (a ^ b) & (used_old[i] | used_new[i])]


def torn_ste_words(old: Words, new: Words) -> list[int]:
    """The double words a torn update of a live STE changed (empty when §3.21 holds).

    Between two observations of a stream that let traffic through before
    and after, the bits either configuration uses may change in at most
    one double word; otherwise the SMMU could have read a mix.
    """
    if not (ste_lets_traffic_through(old) and ste_lets_traffic_through(new)):
        return []
    changed = used_differences(old, new, ste_used_bits(old), ste_used_bits(new))
    return changed if len(changed) > 1 else []


def torn_cd_words(old: Words, new: Words) -> list[int]:
    """The double words a torn update of a valid CD changed (empty when §3.21 holds)."""
    if not (cd_valid(old) and cd_valid(new)):
        return []
    changed = used_differences(old, new, cd_used_bits(old), cd_used_bits(new))
    return changed if len(changed) > 1 else []


def ste_differs(installed: Words, now: Words) -> bool:
    """Whether an STE in memory says something else than the installed one (used bits)."""
    return bool(used_differences(installed, now, ste_used_bits(installed),
                                 ste_used_bits(now)))


_RES0: dict[int, tuple[int, int]] = {
    int(op): (layout.reserved_mask(0), layout.reserved_mask(1))
    for op, layout in COMMAND_LAYOUTS.items()
}


def command_res0_bits(dw0: int, dw1: int) -> tuple[int, int]:
    """The RES0 bits set in a command of a known opcode, per double word ((0, 0) if none).

    An unknown opcode is the model's CERROR_ILL, not a RES0 matter: (0, 0).
    """
    masks = _RES0.get(CMD.OPCODE.get(dw0))
    if masks is None:
        return 0, 0
    return dw0 & masks[0], dw1 & masks[1]


CONFIG_INVALIDATIONS = frozenset({CmdOpcode.CFGI_STE, CmdOpcode.CFGI_STE_RANGE,
                                  CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL})
TLB_INVALIDATIONS = frozenset({CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ASID,
                               CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA,
                               CmdOpcode.TLBI_NSNH_ALL, CmdOpcode.TLBI_S12_VMALL,
                               CmdOpcode.TLBI_S2_IPA, CmdOpcode.TLBI_EL2_ALL,
                               CmdOpcode.TLBI_EL2_ASID, CmdOpcode.TLBI_EL2_VA,
                               CmdOpcode.TLBI_EL2_VAA, CmdOpcode.ATC_INV})
NEEDS_SYNC = CONFIG_INVALIDATIONS | TLB_INVALIDATIONS
"""Commands whose completion only a later CMD_SYNC guarantees (IHI 0070 §4.8)."""
