"""Guest STE → iommufd vSTE: what the translator asks the host to install for a stream.

The host kernel accepts a nested vSTE of two 64-bit words (``struct
iommu_hwpt_arm_smmuv3``) and refuses, with EIO, any bit outside its
"nesting allowed" masks (DESIGN.md §7).  The translator therefore never
forwards a guest STE verbatim: it keeps only the allowed fields, and it
canonicalises abort and bypass STEs to ``V | Config`` so that every abort
stream shares one HWPT and every bypass stream another (QEMU's accelerated
SMMUv3 does the same with its abort/bypass proxy HWPTs).

How each guest STE lookup (:class:`vsmmu.smmu.SteStatus`) maps to a vSTE:

========================  ==============================================
guest STE                 vSTE installed
========================  ==============================================
VALID, Config=0b0xx      ABORT_VSTE (proxy; silent abort; 0b001-0b011
                          are reserved and behave as abort)
VALID, Config=bypass      BYPASS_VSTE (proxy; stage 2 only)
VALID, Config=S1-trans    the allowed fields of words 0-1
INVALID (V=0)             INVALID_VSTE (zero): the kernel installs an abort
                          STE that reports C_BAD_STE for the SID
ILLEGAL                   INVALID_VSTE, same reasoning: a transaction on an
                          ILLEGAL STE is architecturally C_BAD_STE
BAD_STREAMID, FETCH_ABORT ABORT_VSTE; the translator itself records the
                          architectural event on a transaction
========================  ==============================================
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.smmu import SteLookup, SteStatus

logger = logging.getLogger(__name__)

class VsteWords(NamedTuple):
    """The two words of a vSTE; hashable, so identical vSTEs share one nested HWPT."""

    word0: int
    word1: int

    def __str__(self) -> str:
        return f"{self.word0:#018x}:{self.word1:#018x}"


ABORT_VSTE = VsteWords(STE.V.place(1) | STE.CONFIG.place(SteConfig.ABORT), 0)
"""The abort proxy's vSTE: valid, Config=abort (no event, architecturally)."""
BYPASS_VSTE = VsteWords(STE.V.place(1) | STE.CONFIG.place(SteConfig.BYPASS), 0)
"""The bypass proxy's vSTE: valid, Config=bypass (stage 2 only)."""
INVALID_VSTE = VsteWords(0, 0)
"""V=0: installed by the host as abort, with C_BAD_STE reported for the stream."""


_SUBSTREAM_WORD0 = STE.S1FMT.inplace_mask | STE.S1CDMAX.inplace_mask
_SUBSTREAM_WORD1 = STE.S1DSS.inplace_mask
_EATS_WORD1 = STE.EATS.inplace_mask


def vste_for(lookup: SteLookup, *, substreams: bool = True, ats: bool = True) -> VsteWords:
    """The vSTE to install for a guest STE lookup (see the module table).

    Without ``substreams`` (the vSMMU advertises IDR1.SSIDSIZE=0) the guest's
    S1CDMax, S1Fmt and S1DSS are IGNORED (IHI 0070 §5.2) and are cleared, so a
    host SMMU that does support substreams still uses the one CD at S1ContextPtr.
    Likewise without ``ats`` (IDR0.ATS=0) EATS is IGNORED and cleared.

    Masks the raw double words 0-1 with the allowed masks: every allowed
    field is a named STE field, so this equals decoding the STE, encoding it
    back and masking (proven by the nesting unit tests), without either step.
    """
    status = lookup.status
    words = lookup.words
    if status is _VALID and words is not None:
        word0 = words[0]
        config = STE.CONFIG.get(word0)
        if config < _CONFIG_BYPASS:
            # 0b000, and the reserved 0b001-0b011 that behave as it (IHI 0070 §5.2 Config).
            return ABORT_VSTE
        if config == _CONFIG_BYPASS:
            return BYPASS_VSTE
        word0 &= uapi.VSTE_WORD0_ALLOWED
        word1 = words[1] & uapi.VSTE_WORD1_ALLOWED
        if not substreams:
            word0 &= ~_SUBSTREAM_WORD0
            word1 &= ~_SUBSTREAM_WORD1
        if not ats:
            word1 &= ~_EATS_WORD1
        return VsteWords(word0, word1)
    if status is _INVALID or status is _ILLEGAL:
        return INVALID_VSTE
    return ABORT_VSTE


# Plain names for the per-CFGI_STE path (an enum member read through its class is slow).
_VALID = SteStatus.VALID
_INVALID = SteStatus.INVALID
_ILLEGAL = SteStatus.ILLEGAL
_CONFIG_BYPASS = int(SteConfig.BYPASS)
