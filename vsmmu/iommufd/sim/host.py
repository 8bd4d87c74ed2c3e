"""What the simulated host accepts: its personality and the kernel's vSTE check."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from vsmmu.arch.ste import STE, Eats, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HwInfo
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
    ``ds``: ARM_SMMU_FEAT_DS (16K-granule TTL=1 and SCALE[5] in range TLBIs);
    ``s1_input_bits`` / ``s2_input_bits``: the IOVA width of a stage-1 (automatic)
    and a stage-2 (nest parent) domain, whose aperture ends at ``2**bits - 1``
    (arm_smmu_domain_finalise: 48 without VAX, and the SMMU's IAS, 44 on QEMU);
    ``msi_window``: the IOMMU_RESV_SW_MSI region every device reserves in the
    IOAS it is attached to (arm_smmu_get_resv_regions).
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
    s1_input_bits: int = uapi.ARM_SMMU_S1_INPUT_BITS
    s2_input_bits: int = uapi.QEMU_SMMU_IAS_BITS
    msi_window: tuple[int, int] = (uapi.ARM_SMMU_MSI_IOVA_BASE, uapi.ARM_SMMU_MSI_IOVA_LENGTH)

    def check_paging_alloc(self, flags: int, data_type: int, op: str) -> bool:
        """The flag checks of a paging HWPT_ALLOC, in order (iommufd_hwpt_paging_alloc, then
        arm_smmu_domain_alloc_paging_flags); True for a nest parent."""
        f = uapi.HwptAllocFlags
        valid = f.NEST_PARENT | f.DIRTY_TRACKING | f.FAULT_ID_VALID | f.PASID
        if flags & ~int(valid):
            raise _err(errno.EOPNOTSUPP, op, f"paging flags {flags:#x}: unknown bits")
        if flags & f.DIRTY_TRACKING:
            raise _err(errno.EOPNOTSUPP, op, "DIRTY_TRACKING: the host SMMU has no HTTU")
        if flags & f.FAULT_ID_VALID and flags & f.NEST_PARENT:
            raise _err(errno.EOPNOTSUPP, op, "FAULT_ID_VALID on a nest parent")
        if data_type != uapi.HwptDataType.NONE:
            raise _err(errno.EOPNOTSUPP, op, f"data_type {data_type}: a paging HWPT takes none")
        driver = flags & ~int(f.FAULT_ID_VALID)
        if driver not in (0, f.NEST_PARENT, f.PASID):
            raise _err(errno.EOPNOTSUPP, op, f"paging flags {flags:#x}: no such domain")
        if driver == f.NEST_PARENT and not self.nesting:
            raise _err(errno.EOPNOTSUPP, op, "NEST_PARENT: the host SMMU has no nesting")
        return driver == f.NEST_PARENT

    def hw_info(self) -> HwInfo:
        """What GET_HW_INFO returns for a device on this host (arm_smmu_hw_info)."""
        info = uapi.IommuHwInfoArmSmmuv3()
        for i, value in enumerate(self.idr):
            info.idr[i] = value
        info.iidr = self.iidr
        info.aidr = self.aidr
        caps = uapi.HwCapabilities(0)
        if not self.ats:
            caps |= uapi.HwCapabilities.PCI_ATS_NOT_SUPPORTED
        return HwInfo(uapi.HwInfoType.ARM_SMMUV3, info.to_bytes(), caps, self.max_pasid_log2)


QEMU_SMMUV3 = HostPersonality(s2fwb=False, ats=False, ssid_bits=0,
                               idr=(0x0D44_101B, 0x0273_0010, 0, 0x1414, 0, 0x74), aidr=1)
"""QEMU 11.1.3's SMMUv3 under the host lane's kernel: nesting, range invalidation,
16-bit ASIDs, CANWBS from the upgraded IORT; no S2FWB, no ATS, no substreams, no DS.
The ID registers are those GET_HW_INFO returned in the host lane (kernel 7.3.4)."""


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


def check_no_fault_id(flags: int, op: str) -> None:
    """FAULT_ID_VALID names a FAULT object, looked up once the HWPT is built
    (iommufd_hwpt_alloc): the sim has none, so ENOENT."""
    if flags & uapi.HwptAllocFlags.FAULT_ID_VALID:
        raise _err(errno.ENOENT, op, "fault_id: the sim has no FAULT objects")
