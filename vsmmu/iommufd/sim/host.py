"""What the simulated host accepts: its personality and the kernel's vSTE check."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from vsmmu.arch.ste import STE, Eats, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.sim.objects import sim_error as _err


@dataclass(frozen=True)
class HostPersonality:
    """What the simulated host kernel and physical SMMU support.

    ``nesting``: ARM_SMMU_FEAT_NESTING (NEST_PARENT HWPTs and vIOMMUs);
    ``ats_in_nested``: a vSTE with EATS≠0 is accepted (False models the first
    nesting series, where any EATS≠0 made HWPT_ALLOC fail with EIO);
    ``s2fwb`` / ``canwbs``: without either the kernel refuses a vIOMMU;
    ``range_invalidation``: IDR3.RIL reported; ``idr``/``iidr``/``aidr``: the
    ID registers GET_HW_INFO returns; ``ats``: ARM_SMMU_FEAT_ATS (ATC_INV is
    EIO without it, and GET_HW_INFO reports PCI_ATS_NOT_SUPPORTED);
    ``asid_bits`` / ``ssid_bits``: the SMMU's ASID and SubstreamID widths;
    ``ds``: ARM_SMMU_FEAT_DS (16K-granule TTL=1 and SCALE[5] in range TLBIs).
    :data:`QEMU_SMMUV3` is the host the lane's kernel runs on.
    """

    nesting: bool = True
    ats_in_nested: bool = True
    s2fwb: bool = True
    canwbs: bool = True
    range_invalidation: bool = True
    idr: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    iidr: int = 0
    aidr: int = 0
    max_pasid_log2: int = 0
    ats: bool = True
    asid_bits: int = 16
    ssid_bits: int = 20
    ds: bool = False


QEMU_SMMUV3 = HostPersonality(s2fwb=False, ats=False, ssid_bits=0)
"""QEMU 11.1.3's SMMUv3 under the host lane's kernel: nesting, range invalidation,
16-bit ASIDs, CANWBS from the upgraded IORT; no S2FWB, no ATS, no substreams, no DS."""


def validate_vste(ste: Sequence[int], ats_in_nested: bool, op: str) -> tuple[tuple[int, int], bool]:
    """``arm_smmu_validate_vste``: return the stored vSTE words and ``enable_ats``.

    V=0 is accepted and zeroed; bits outside the nesting-allowed masks, a
    Config other than abort/bypass/S1-translate, or an EATS the host does not
    accept are EIO.  EATS is cleared from what is stored.
    """
    w0, w1 = ste[0], ste[1]
    if not STE.V.test(w0):
        return (0, 0), False
    if w0 & ~uapi.VSTE_WORD0_ALLOWED or w1 & ~uapi.VSTE_WORD1_ALLOWED:
        raise _err(
            errno.EIO,
            op,
            f"vSTE {w0:#018x} {w1:#018x} sets bits outside the nesting-allowed masks "
            f"{uapi.VSTE_WORD0_ALLOWED:#018x} {uapi.VSTE_WORD1_ALLOWED:#018x}",
        )
    cfg = STE.CONFIG.get(w0)
    if cfg not in (SteConfig.ABORT, SteConfig.BYPASS, SteConfig.S1_TRANS):
        raise _err(errno.EIO, op, f"vSTE Config {cfg:#b}: expected abort, bypass or S1-translate")
    eats = STE.EATS.get(w1)
    allowed = (Eats.ABORT, Eats.FULL) if ats_in_nested else (Eats.ABORT,)
    if eats not in allowed:
        accepted = [int(e) for e in allowed]
        raise _err(errno.EIO, op, f"vSTE EATS={eats}: this host accepts {accepted}")
    enable_ats = cfg == SteConfig.S1_TRANS and eats == Eats.FULL
    return (w0, STE.EATS.put(w1, 0)), enable_ats
