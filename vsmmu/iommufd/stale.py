"""Would a transaction use a cache the guest's tables no longer back? (the sanitizer's question)

The sim's physical SMMU caches a stream's CD (until a CFGI) and its stage-1
translations in the IOTLB (until a TLBI), as hardware does.  A guest that
edits a CD or a page table and forgets the invalidation gets the old answer
from those caches.  :func:`stale_cache` compares what the caches hold for
one page with a fresh walk of the guest's tables *by the walker's own
steps* (so there is one definition of a walk), touching no cache.
"""

from __future__ import annotations

import dataclasses

from vsmmu.arch.events import EventClass
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd.sim import SimDevice, SimHwptNested, SimIommufd
from vsmmu.iommufd.sim.iotlb import TLB_PAGE_MASK, TLB_PAGE_SHIFT
from vsmmu.iommufd.sim.physical_smmu import _Fault


@dataclasses.dataclass(frozen=True)
class StaleCache:
    """A cached CD (``what="cd"``) or IOTLB entry (``"translation"``) that differs from
    the guest's tables now; ``reason`` says how."""

    what: str
    asid: int
    reason: str


def stale_cache(sim: SimIommufd, dev_id: int, iova: int) -> StaleCache | None:
    """What device ``dev_id``'s transaction at ``iova`` would take from a stale cache.

    None when nothing cached would be used, or the caches agree with the
    guest's tables.  Never raises for guest data.
    """
    dev = sim.object(dev_id)
    if not isinstance(dev, SimDevice) or not isinstance(dev.hwpt, SimHwptNested):
        return None
    hwpt = dev.hwpt
    ste0 = hwpt.ste[0]
    if not STE.V.test(ste0) or STE.CONFIG.get(ste0) != SteConfig.S1_TRANS:
        return None
    viommu = hwpt.viommu
    ioas = viommu.parent.ioas
    phys = sim.smmu
    cd = phys.cd_cache.get(dev.stream_id)
    if cd is None:
        return None  # the next transaction fetches the CD afresh
    try:
        now = phys._fetch_cd(ioas, ste0)
    except (_Fault, IndexError, ValueError, KeyError) as exc:
        return StaleCache("cd", cd.asid, f"the cached CD is in use, guest memory now: {exc}")
    if now != cd:
        return StaleCache("cd", cd.asid, f"cached {cd}, guest memory now {now}")
    entry = phys.tlb.get((viommu.vmid, cd.asid, iova >> TLB_PAGE_SHIFT))
    if entry is None:
        return None  # an IOTLB miss walks the tables afresh
    try:
        _, _, out_ipa, writable = phys._stage1(ioas, cd, iova, False)
        view, off = phys._stage2(ioas, out_ipa, False, EventClass.IN, iova)
    except (_Fault, IndexError, ValueError, KeyError) as exc:
        return StaleCache("translation", cd.asid,
                          f"IOTLB maps IOVA {iova:#x}, the guest's tables now: {exc}")
    page_offset = off - (out_ipa & TLB_PAGE_MASK)
    if view is not entry.view or page_offset != entry.offset or writable != entry.writable:
        return StaleCache("translation", cd.asid,
                          f"IOTLB: IOVA {iova:#x} -> host page +{entry.offset:#x} "
                          f"{'rw' if entry.writable else 'ro'}; the guest's tables now: "
                          f"IPA {out_ipa:#x} {'rw' if writable else 'ro'}")
    return None
