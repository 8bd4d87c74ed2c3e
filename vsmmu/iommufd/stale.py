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
from typing import cast

from vsmmu.arch.cd import CD_SIZE
from vsmmu.arch.events import EventClass
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd.sim import SimDevice, SimHwptNested, SimIommufd
from vsmmu.iommufd.sim.iotlb import TLB_PAGE_MASK, TLB_PAGE_SHIFT
from vsmmu.iommufd.sim.objects import IoasMap, SimIoas
from vsmmu.iommufd.sim.physical_smmu import _Fault


@dataclasses.dataclass(frozen=True)
class StaleCache:
    """A cached CD (``what="cd"``) or IOTLB entry (``"translation"``) that differs from
    the guest's tables now; ``reason`` says how."""

    what: str
    asid: int
    reason: str


class _RecordingIoas:
    """Stands in for a SimIoas during a walk: records every IPA the walker looks up."""

    def __init__(self) -> None:
        self.ioas: SimIoas | None = None
        self.ipas: list[int] = []

    def lookup(self, ipa: int) -> IoasMap | None:
        self.ipas.append(ipa)
        assert self.ioas is not None
        return self.ioas.lookup(ipa)


Fingerprint = tuple[tuple[int, bytes], ...]
"""What a walk read: each IPA it looked up and the bytes there (up to a CD's size)."""
VERIFIED_LIMIT = 4096
"""Pages remembered as verified (emptied when full)."""


def _fingerprint(ioas: SimIoas, ipas: list[int]) -> Fingerprint:
    out = []
    for ipa in ipas:
        m = ioas.lookup(ipa)
        if m is None:
            out.append((ipa, b""))
            continue
        off = ipa - m.iova
        out.append((ipa, bytes(m.mapping.view()[off:off + CD_SIZE])))
    return tuple(out)


class StaleCacheChecker:
    """:func:`stale_cache` with memory: a page found consistent is re-walked only when a
    byte the walk read (CD, descriptors) has changed, or the cached CD or IOTLB entry is
    another one.  The answer is the same; a steady stream of DMA to the same pages costs
    a few reads instead of a CD fetch and a page walk per access."""

    def __init__(self, sim: SimIommufd) -> None:
        self.sim = sim
        self._verified: dict[tuple[int, int], tuple[object, object, Fingerprint]] = {}

    def check(self, dev_id: int, iova: int) -> StaleCache | None:
        """Same as ``stale_cache(sim, dev_id, iova)``."""
        sim = self.sim
        dev = sim.object(dev_id)
        if not isinstance(dev, SimDevice) or not isinstance(dev.hwpt, SimHwptNested) \
                or dev.hwpt.viommu is None:
            return None
        viommu = dev.hwpt.viommu
        cd = sim.smmu.cd_cache.get(dev.stream_id)
        if cd is None:
            return None
        entry = sim.smmu.tlb.get((viommu.vmid, cd.asid, iova >> TLB_PAGE_SHIFT))
        key = (dev_id, iova >> TLB_PAGE_SHIFT)
        seen = self._verified.get(key)
        ioas = viommu.parent.ioas if viommu.parent is not None else None
        if seen is not None and ioas is not None and seen[0] is cd and seen[1] is entry \
                and _fingerprint(ioas, [ipa for ipa, _ in seen[2]]) == seen[2]:
            return None
        recorder = _RecordingIoas()
        stale = _check(sim, dev_id, iova, recorder)
        if stale is None and recorder.ioas is not None:
            if len(self._verified) >= VERIFIED_LIMIT:
                self._verified.clear()
            self._verified[key] = (cd, entry, _fingerprint(recorder.ioas, recorder.ipas))
        return stale


def stale_cache(sim: SimIommufd, dev_id: int, iova: int) -> StaleCache | None:
    """What device ``dev_id``'s transaction at ``iova`` would take from a stale cache.

    None when nothing cached would be used, or the caches agree with the
    guest's tables.  Never raises for guest data.
    """
    return _check(sim, dev_id, iova, None)


def _check(sim: SimIommufd, dev_id: int, iova: int,
           recorder: _RecordingIoas | None) -> StaleCache | None:
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
    ioas = real = viommu.parent.ioas
    if recorder is not None:
        recorder.ioas = ioas
        ioas = cast(SimIoas, recorder)  # the walker only calls lookup(); it records the IPAs
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
        # An IOTLB miss walks again (from a last-level table the walk cache kept at most:
        # a guest that changed a table above it sees its check on the next access, a hit).
        return None
    try:
        _, _, out_ipa, writable = phys._stage1(ioas, cd, iova, False)
        # The output page itself is data, not a table: not part of what the walk read.
        view, off = phys._stage2(real, out_ipa, False, EventClass.IN, iova)
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
