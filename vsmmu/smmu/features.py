"""The feature set a vSMMUv3 advertises, and the ID registers computed from it.

Defaults suit nesting the way QEMU's accelerated SMMUv3 does: stage 1 only,
AArch64 little-endian tables, coherent, 16-bit ASIDs, 2-level stream
tables, wired GERROR/EVTQ interrupts, MSI for CMD_SYNC completion only
(IDR0.MSI: with coherent access Linux then polls memory instead of
CMDQ_CONS), no SEV, terminate-only stall model, no ATS, no PRI, no range
invalidation.  A backend may later narrow or widen
this (e.g. ATS on for the "host rejects EATS" scenario) by building a new
:class:`SmmuFeatures` with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from vsmmu.arch.registers import (
    AIDR,
    IDR0,
    IDR1,
    IDR3,
    IDR5,
    OAS_BITS,
    Oas,
    Reg,
    StallModel,
    StLevel,
    TtEndian,
    Ttf,
)
from vsmmu.smmu.interfaces import SmmuError

logger = logging.getLogger(__name__)

LINUX_MIN_CMDQS = 7
"""Linux's arm-smmu-v3 rejects CMDQS <= log2(64) (DESIGN.md §8)."""


@dataclasses.dataclass(frozen=True)
class SmmuFeatures:
    """What the vSMMU advertises. Validated on construction (raises SmmuError)."""

    sidsize: int = 16
    ssidsize: int = 0
    cmdqs: int = 10
    evtqs: int = 8
    oas: Oas = Oas.BITS_44
    two_level_strtab: bool = True
    cd2l: bool = True
    asid16: bool = True
    cohacc: bool = True
    msi: bool = True
    """IDR0.MSI: CMD_SYNC's CS=SIG_IRQ writes its MSI into guest RAM."""
    ats: bool = False
    ril: bool = False
    gran4k: bool = True
    gran16k: bool = True
    gran64k: bool = True
    arch_minor: int = 1

    def __post_init__(self) -> None:
        limits = {"sidsize": (self.sidsize, IDR1.SIDSIZE.mask, 0),
                  "ssidsize": (self.ssidsize, 20, 0),
                  "cmdqs": (self.cmdqs, 19, LINUX_MIN_CMDQS),
                  "evtqs": (self.evtqs, 19, 0)}
        for name, (value, high, low) in limits.items():
            if not low <= value <= high:
                raise SmmuError(f"SmmuFeatures.{name}={value}: expected {low}..{high}")
        if self.sidsize > 32:
            raise SmmuError(f"SmmuFeatures.sidsize={self.sidsize}: expected at most 32")
        if not (self.gran4k or self.gran16k or self.gran64k):
            raise SmmuError("SmmuFeatures: expected at least one translation granule")

    @functools.cached_property
    def oas_bits(self) -> int:
        """Output address size in bits (cached: every CMD_CFGI_STE of a stage-1 STE asks)."""
        return OAS_BITS[self.oas]

    def granule_supported(self, page_shift: int) -> bool:
        """Whether the granule with ``page_shift`` (12, 14, 16) is advertised."""
        return {12: self.gran4k, 14: self.gran16k, 16: self.gran64k}.get(page_shift, False)

    def id_registers(self) -> dict[Reg, int]:
        """IDR0-5, IIDR and AIDR values for this feature set."""
        idr0 = (IDR0.S1P.place(1) | IDR0.TTF.place(Ttf.AARCH64)
                | IDR0.COHACC.place(int(self.cohacc)) | IDR0.ATS.place(int(self.ats))
                | IDR0.MSI.place(int(self.msi))
                | IDR0.ASID16.place(int(self.asid16)) | IDR0.CD2L.place(int(self.cd2l))
                | IDR0.TTENDIAN.place(TtEndian.LE)
                | IDR0.STALL_MODEL.place(StallModel.TERMINATE_ONLY)
                | IDR0.TERM_MODEL.place(1)
                | IDR0.ST_LEVEL.place(StLevel.TWO_LEVEL if self.two_level_strtab
                                      else StLevel.LINEAR))
        idr1 = (IDR1.SIDSIZE.place(self.sidsize) | IDR1.SSIDSIZE.place(self.ssidsize)
                | IDR1.EVENTQS.place(self.evtqs) | IDR1.CMDQS.place(self.cmdqs))
        idr3 = IDR3.RIL.place(int(self.ril))
        idr5 = (IDR5.OAS.place(self.oas) | IDR5.GRAN4K.place(int(self.gran4k))
                | IDR5.GRAN16K.place(int(self.gran16k)) | IDR5.GRAN64K.place(int(self.gran64k)))
        aidr = AIDR.ARCH_MINOR_REV.place(self.arch_minor)
        return {Reg.IDR0: idr0, Reg.IDR1: idr1, Reg.IDR2: 0, Reg.IDR3: idr3, Reg.IDR4: 0,
                Reg.IDR5: idr5, Reg.IIDR: 0, Reg.AIDR: aidr}

