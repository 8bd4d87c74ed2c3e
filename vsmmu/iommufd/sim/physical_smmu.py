"""The simulated physical SMMU: nested DMA translation, IOTLB, fault events.

:class:`PhysicalSmmu` belongs to a :class:`vsmmu.iommufd.sim.SimIommufd` and
translates the DMA of its mock devices through each device's attached HWPT
(it reports the events it forwards through the callable it is given, so it
knows nothing of the backend that owns it):

* not attached: blocked (``DmaFault``, no event);
* ``HWPT_PAGING``: stage 2 only, the IOAS mappings;
* ``HWPT_NESTED``: the physical STE the kernel would build from the vSTE —
  V=0 → ``C_BAD_STE`` (the kernel installs an abort STE "with the intention
  that C_BAD_STE for this SID can be generated to userspace"); Config=abort →
  silent abort (architecturally no event); bypass → stage 2 only;
  S1-translate → the CD is fetched from ``S1ContextPtr`` (linear or 2-level
  by ``S1Fmt``, SubstreamID 0) and stage 1 is walked from TTB0/TTB1 chosen by
  T0SZ/T1SZ and EPD0/EPD1, with TG0/TG1 granules 4K/16K/64K, table, block
  and page descriptors, AF and AP[2:1].  Every table and CD address is an IPA
  translated through stage 2 (the IOAS).

IOTLB (:mod:`.iotlb`): entries are tagged (VMID, ASID, VA 4K page) and hold
the final host location of that page, as a combined S1+S2 TLB does.  A changed guest table
is therefore *not* seen until the guest invalidates: TLBI_NH_VA/VAA (with
range), NH_ASID, NH_ALL and NSNH_ALL (through ``HWPT_INVALIDATE``) remove
entries; CFGI_CD/CFGI_CD_ALL drop the cached CD; an IOAS map/unmap flushes
everything (the kernel invalidates stage 2 itself).  A walk cache keeps the
last-level table of each 4K-page walk across TLBIs by address with Leaf=1, as
an SMMU may (IHI 0070 §4.4.1); a Leaf=0 TLBI and every other invalidation drop it.

Fast path: a hit is also remembered per device as ``{4K page: (host page
view, writable)}`` in :attr:`PhysicalSmmu.fast`, which ``dma_read`` /
``dma_write`` consult before anything else for accesses within one page.
It only caches what a TLB hit would return, and is dropped whole on every
IOTLB change, CD-cache drop, STE change and stage-2 change, so staleness
and invalidation behave exactly as without it.

Fault policy (as the Linux host driver reports them): a stage-1 fault or a
configuration error of a device with a vDEVICE is forwarded to its vIOMMU's
vEVENTQ with the StreamID replaced by the vSID (ids C_BAD_STE, C_BAD_CD,
C_BAD_SUBSTREAMID, F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION);
stage-2 faults (S2=1), faults of non-nested devices and events with no
vEVENTQ are host events: logged and appended to :attr:`PhysicalSmmu.host_events`.
Either way the DMA raises :class:`DmaFault` carrying the event.

CD checks follow IHI 0070 §5.4 for an SMMU without HTTU and with 48-bit
tables: HA/HD set, a TTBx beyond the effective IPS (0b111 behaves as 0b110)
are C_BAD_CD; AFFD=1 takes AF=0 as 1; S1Fmt is IGNORED when S1CDMax=0.

Not modelled: APTable/PXNTable hierarchical permissions, contiguous hints,
hardware AF/dirty updates, stall mode, SubstreamIDs other than 0, 52-bit
addresses.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vsmmu.arch.cd import (
    CD,
    CD_SIZE,
    CD_TXSZ_MAX,
    CD_TXSZ_MIN,
    L1_CD_SIZE,
    L1CD,
    TG0_PAGE_SHIFT,
    TG1_PAGE_SHIFT,
)
from vsmmu.arch.commands import CMD, CmdOpcode, tlbi_range_bytes
from vsmmu.arch.events import EVT, Event, EventClass, EventId, decode_event, encode_event
from vsmmu.arch.pagetables import (
    DESC,
    DESCRIPTOR_SIZE,
    GRANULES_BY_SHIFT,
    MAX_LEVEL,
    OA_BITS,
    Ap,
    DescriptorKind,
    Granule,
    classify,
    output_address,
)
from vsmmu.arch.registers import OAS_BITS, Oas
from vsmmu.arch.ste import STE, S1Fmt, SteConfig
from vsmmu.iommufd.backend import DmaFault, IommufdError
from vsmmu.iommufd.sim.iotlb import (
    TLB_CAPACITY,
    TLB_PAGE_MASK,
    TLB_PAGE_SHIFT,
    TLB_PAGE_SIZE,
    Iotlb,
    TlbEntry,
)
from vsmmu.iommufd.sim.objects import SimDevice, SimHwptNested, SimHwptPaging, SimIoas, SimViommu
from vsmmu.iommufd.uapi import IoasMapFlags

log = logging.getLogger(__name__)

VA_BITS = 64
WALK_CACHE_CAPACITY = 512
"""Last-level tables the walk cache keeps (1 GiB of 4K-page VA) before it starts over."""

EventReporter = Callable[[SimViommu, bytes], bool]
"""Delivers one event record to a vIOMMU's vEVENTQ; False when it has none."""

# Events the host driver forwards to a vEVENTQ (arm_smmu_handle_evt, nested masters).
FORWARDED_EVENTS = frozenset(
    {
        EventId.C_BAD_STE,
        EventId.F_STREAM_DISABLED,
        EventId.C_BAD_SUBSTREAMID,
        EventId.C_BAD_CD,
        EventId.F_TRANSLATION,
        EventId.F_ADDR_SIZE,
        EventId.F_ACCESS,
        EventId.F_PERMISSION,
    }
)
_OPCODE_MASK = CMD.OPCODE.inplace_mask
_LEAF = CMD.LEAF.inplace_mask
_TLBI_NH_VA = int(CmdOpcode.TLBI_NH_VA)
_TLBI_NH_VAA = int(CmdOpcode.TLBI_NH_VAA)
_TLBI_BY_ADDRESS = frozenset({_TLBI_NH_VA, _TLBI_NH_VAA})
_BY_STREAM = frozenset({CmdOpcode.ATC_INV, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL})
"""Invalidations that name a vSID (converted to the physical StreamID)."""
ALLOWED_INVALIDATIONS = frozenset(
    {
        CmdOpcode.TLBI_NSNH_ALL,
        CmdOpcode.TLBI_NH_VA,
        CmdOpcode.TLBI_NH_VAA,
        CmdOpcode.TLBI_NH_ALL,
        CmdOpcode.TLBI_NH_ASID,
        CmdOpcode.ATC_INV,
        CmdOpcode.CFGI_CD,
        CmdOpcode.CFGI_CD_ALL,
    }
)


@dataclass(frozen=True, slots=True)
class CdConfig:
    """The fields of a valid CD the walker uses."""

    asid: int
    ttb: tuple[int, int]
    tsz: tuple[int, int]
    shift: tuple[int, int]
    epd: tuple[bool, bool]
    oa_bits: int
    #: CD.AFFD: a leaf with AF=0 is taken as AF=1, no Access flag fault (IHI 0070 §5.4).
    affd: bool = False


_IPS_52 = int(Oas.BITS_52)
_CLASS_IN = int(EventClass.IN)
_S2_WRITEABLE = int(IoasMapFlags.WRITEABLE)
_INVALID = DescriptorKind.INVALID
_RESERVED = DescriptorKind.RESERVED
_TABLE = DescriptorKind.TABLE
_AP_RW_ANY = int(Ap.RW_ANY)
_AP_RO_ANY = int(Ap.RO_ANY)
_U64_FROM = int.from_bytes


class _Fault(Exception):
    """Internal: a fault with its event fields, turned into DmaFault by the caller."""

    def __init__(self, event_id: EventId, reason: str, **fields: int) -> None:
        super().__init__(reason)
        self.event_id = event_id
        self.fields = fields


def _level_fault(event_id: EventId, what: str, level: int, desc: int, desc_ipa: int,
                 iova: int) -> _Fault:
    """A stage-1 fault at a descriptor (its message built only when it happens)."""
    return _Fault(event_id, f"level {level} descriptor {desc:#x} at IPA {desc_ipa:#x}: {what}",
                  event_class=_CLASS_IN, input_addr=iova)


class PhysicalSmmu:
    """The sim's physical SMMU (see the module docstring)."""

    def __init__(self, report_event: EventReporter) -> None:
        self._report_event = report_event
        self.tlb = Iotlb()
        self.cd_cache: dict[int, CdConfig] = {}
        # The hit fast path: dev_id -> {4K page number: (that host page's view, writable)}.
        # A pure cache of what a TLB hit would return, so it is dropped whole on every
        # change to the IOTLB, the CD cache or an STE (all rare next to DMA), except a
        # TLBI by address, which drops the pages whose entries it removed (strict-mode
        # guests issue one per unmap).
        self.fast: dict[int, dict[int, tuple[memoryview, bool]]] = {}
        # The walk cache: (VMID, ASID, VA >> span of a last-level table) -> the IPA of the
        # last-level table that VA's walk ended in.  An SMMU may keep such non-leaf entries
        # across a TLBI by address with Leaf=1 (IHI 0070 §4.4.1), which is how a strict-mode
        # guest unmaps, so the miss on a page next to one it unmapped reads one descriptor,
        # not four.  A Leaf=0 TLBI (Linux's when it frees a table) and every other change
        # that could alter a walk drop it whole.
        self.walk_cache: dict[tuple[int, int, int], int] = {}
        self.host_events: list[Event] = []
        self.walks = 0

    # --- configuration and invalidation hooks from the object model ---

    def install_ste(self, dev: SimDevice) -> None:
        """A new physical STE for ``dev`` (attach/replace/detach): CFGI_STE semantics."""
        self.cd_cache.pop(dev.stream_id, None)
        self.fast.clear()
        self.walk_cache.clear()

    def flush_stage2(self, ioas: SimIoas) -> None:
        """The IOAS changed: the kernel invalidates stage 2, which drops combined entries."""
        del ioas
        self.tlb.clear()
        self.fast.clear()
        self.walk_cache.clear()

    def flush_vmid(self, vmid: int) -> None:
        """Drop every entry of ``vmid`` (its S2 HWPT is gone)."""
        for key in [k for k in self.tlb if k[0] == vmid]:
            del self.tlb[key]
        self.fast.clear()
        self.walk_cache.clear()

    def invalidate_batch(
        self, viommu: SimViommu, entries: Sequence[tuple[int, int]], op: str
    ) -> int:
        """Convert each command as arm_vsmmu_convert_user_cmd and execute it, in order;
        return how many (all of them).

        The backend hands over only commands its check (UserCommandCheck,
        vSID lookup included) took; a command refused here anyway raises
        IommufdError with ``handled`` = its index, the commands before it run.
        """
        tlb = self.tlb
        for index, (w0, w1) in enumerate(entries):
            opcode = w0 & _OPCODE_MASK
            # A TLBI by address is the guest's command per unmapped range: it stays in the
            # loop, and costs nothing while nothing is cached.
            if opcode in _TLBI_BY_ADDRESS:
                if not w1 & _LEAF:
                    self.walk_cache.clear()  # Leaf=0: the walk's table entries go too
                if tlb:
                    self._tlbi_by_address(viommu.vmid, opcode, w0, w1)
                continue
            try:
                self._invalidate(viommu, opcode, w0, op)
            except IommufdError as exc:
                exc.handled = index
                raise
        return len(entries)

    def _tlbi_by_address(self, vmid: int, opcode: int, w0: int, w1: int) -> None:
        tlb = self.tlb
        start, end = self._tlbi_range(w0, w1)
        dead = tlb.overlapping(vmid, None if opcode == _TLBI_NH_VAA else CMD.ASID.get(w0),
                               start, end)
        fast = self.fast.values()
        for key in dead:
            del tlb[key]
            for pages in fast:  # what a hit on that entry put in the fast path
                pages.pop(key[2], None)

    def _invalidate(self, viommu: SimViommu, opcode: int, w0: int, op: str) -> None:
        """Any other command: by vSID (converted to the physical StreamID) or by VMID/ASID."""
        if opcode not in ALLOWED_INVALIDATIONS:
            raise IommufdError(
                errno.EIO, op, f"command opcode {opcode:#04x}: not an allowed invalidation"
            )
        self.walk_cache.clear()  # a CD change may point the same ASID at other tables
        if opcode in _BY_STREAM:
            self.fast.clear()
            vsid = CMD.SID.get(w0)
            vdev = viommu.vdevs.get(vsid)
            if vdev is None:
                raise IommufdError(
                    errno.EIO, op, f"vSID {vsid:#x}: no vDEVICE on vIOMMU {viommu.id}"
                )
            psid = vdev.device.stream_id
            if opcode != CmdOpcode.ATC_INV:
                self.cd_cache.pop(psid, None)
            return
        tlb = self.tlb
        if not tlb:
            return  # nothing cached: every TLBI is complete at once
        self.fast.clear()
        vmid = viommu.vmid
        if opcode == CmdOpcode.TLBI_NH_ALL or opcode == CmdOpcode.TLBI_NSNH_ALL:
            dead = [k for k in tlb if k[0] == vmid]
        else:
            asid = CMD.ASID.get(w0)
            dead = [k for k in tlb if k[0] == vmid and k[1] == asid]
        for key in dead:
            del tlb[key]

    @staticmethod
    def _tlbi_range(w0: int, w1: int) -> tuple[int, int]:
        """``[start, end)`` of a TLBI by address; one byte when it names no range."""
        addr = CMD.VA.get(w1)
        size = tlbi_range_bytes(CMD.TG.get(w1), CMD.NUM.get(w0), CMD.SCALE.get(w0))
        return addr, addr + (size or 1)

    # --- DMA ---

    def access(self, dev: SimDevice, iova: int, length: int, write: bool) -> list[memoryview]:
        """Translate ``[iova, iova + length)``; return host views covering it in order.

        Raises DmaFault (after reporting the event) on the first faulting page.
        """
        views: list[memoryview] = []
        while length > 0:
            chunk = min(length, TLB_PAGE_MASK + 1 - (iova & TLB_PAGE_MASK))
            view, off = self._translate_page(dev, iova, write)
            views.append(view[off : off + chunk])
            iova += chunk
            length -= chunk
        return views

    def _translate_page(self, dev: SimDevice, iova: int, write: bool) -> tuple[memoryview, int]:
        hwpt = dev.hwpt
        if isinstance(hwpt, SimHwptNested):
            vmid = hwpt.viommu.vmid
            ste0 = hwpt.ste[0]
            cfg = STE.CONFIG.get(ste0)
            if STE.V.test(ste0) and cfg == SteConfig.S1_TRANS:
                cd = self.cd_cache.get(dev.stream_id)
                if cd is not None:
                    entry = self.tlb.get((vmid, cd.asid, iova >> TLB_PAGE_SHIFT))
                    if entry is not None and (entry.writable or not write):
                        self._remember(dev, iova, entry)
                        return entry.view, entry.offset + (iova & TLB_PAGE_MASK)
        try:
            return self._walk(dev, iova, write)
        except _Fault as fault:
            raise self._report(dev, iova, write, fault) from None
        except (IndexError, ValueError, KeyError) as exc:  # hostile tables never escape raw
            raise self._report(
                dev, iova, write, _Fault(EventId.C_BAD_CD, f"malformed configuration: {exc}")
            ) from None

    def _walk(self, dev: SimDevice, iova: int, write: bool) -> tuple[memoryview, int]:
        self.walks += 1
        hwpt = dev.hwpt
        if hwpt is None:
            raise DmaFault(f"device {dev.id} (SID {dev.stream_id:#x}) is not attached: blocked")
        if isinstance(hwpt, SimHwptPaging):
            return self._stage2(hwpt.ioas, iova, write, EventClass.IN, iova)
        viommu = hwpt.viommu
        ioas = viommu.parent.ioas
        ste0, _ = hwpt.ste
        if not STE.V.test(ste0):
            raise _Fault(EventId.C_BAD_STE, "vSTE V=0")
        cfg = STE.CONFIG.get(ste0)
        if cfg == SteConfig.ABORT:
            raise DmaFault(f"device {dev.id}: vSTE Config=abort (no event)")
        if cfg == SteConfig.BYPASS:
            return self._stage2(ioas, iova, write, EventClass.IN, iova)
        cd = self.cd_cache.get(dev.stream_id)
        if cd is None:
            cd = self._fetch_cd(ioas, ste0)
            self.cd_cache[dev.stream_id] = cd
        leaf_base, leaf_size, out_ipa, writable = self._stage1(ioas, cd, iova, write,
                                                               viommu.vmid)
        view, off = self._stage2(ioas, out_ipa, write, EventClass.IN, iova)
        page_off = off - (out_ipa & TLB_PAGE_MASK)
        key = (viommu.vmid, cd.asid, iova >> TLB_PAGE_SHIFT)
        if key in self.tlb or len(self.tlb) >= TLB_CAPACITY:
            self.tlb.pop(key if key in self.tlb else next(iter(self.tlb)))
            self.fast.clear()
        entry = TlbEntry(leaf_base, leaf_size, view, page_off, writable)
        self.tlb[key] = entry
        self._remember(dev, iova, entry)
        return view, off

    def _remember(self, dev: SimDevice, iova: int, entry: TlbEntry) -> None:
        """Put the 4K host page of a TLB hit into the device's fast path."""
        page = entry.view[entry.offset : entry.offset + TLB_PAGE_SIZE]
        self.fast.setdefault(dev.id, {})[iova >> TLB_PAGE_SHIFT] = (page, entry.writable)

    def _stage2(
        self, ioas: SimIoas, ipa: int, write: bool, cls: EventClass, iova: int
    ) -> tuple[memoryview, int]:
        # An IPA beyond any stage-2 input range (>= 2^52) is unmapped: a stage-2
        # translation fault whose record holds IPA[51:12], as the field is wide.
        m = ioas.lookup(ipa)
        if m is None:
            raise _Fault(
                EventId.F_TRANSLATION, f"S2: IPA {ipa:#x} not mapped", s2=1,
                ipa=EVT.IPA.clamp(ipa), event_class=int(cls), input_addr=iova,
            )
        if write and not m.flags & _S2_WRITEABLE:
            raise _Fault(
                EventId.F_PERMISSION, f"S2: IPA {ipa:#x} read-only", s2=1, ipa=EVT.IPA.clamp(ipa),
                event_class=int(cls), input_addr=iova,
            )
        return m.mapping.view(), ipa - m.iova

    def _read_ipa(self, ioas: SimIoas, ipa: int, size: int, cls: EventClass, iova: int) -> bytes:
        view, off = self._stage2(ioas, ipa, False, cls, iova)
        return bytes(view[off : off + size])

    def _fetch_cd(self, ioas: SimIoas, ste0: int) -> CdConfig:
        ptr = STE.S1CONTEXTPTR.get(ste0)
        fmt = STE.S1FMT.get(ste0)
        # With S1CDMax=0 S1Fmt is IGNORED: S1ContextPtr points at the one CD (IHI 0070 §5.2).
        if STE.S1CDMAX.get(ste0) and fmt in (S1Fmt.TWO_LEVEL_4K, S1Fmt.TWO_LEVEL_64K):
            l1 = int.from_bytes(self._read_ipa(ioas, ptr, L1_CD_SIZE, EventClass.CD, 0), "little")
            if not L1CD.V.test(l1):
                raise _Fault(EventId.C_BAD_SUBSTREAMID, "L1CD V=0 for SubstreamID 0")
            ptr = L1CD.L2PTR.get(l1)
            # SubstreamID 0 is index 0 in the L1 table and in the leaf table.
        elif STE.S1CDMAX.get(ste0) and fmt != S1Fmt.LINEAR:
            raise _Fault(EventId.C_BAD_STE, f"S1Fmt {fmt} reserved")
        raw = self._read_ipa(ioas, ptr, CD_SIZE, EventClass.CD, 0)
        words = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8)]
        w0 = words[0]
        if not CD.V.test(w0):
            raise _Fault(EventId.C_BAD_CD, "CD V=0")
        if not CD.AA64.test(w0):
            raise _Fault(EventId.C_BAD_CD, "CD AA64=0: only AArch64 tables are supported")
        if CD.HA.test(w0) or CD.HD.test(w0):
            # This SMMU has no HTTU: setting HA or HD is ILLEGAL (IHI 0070 §5.4 HA, HD).
            raise _Fault(EventId.C_BAD_CD, "CD HA/HD=1 without HTTU")
        tsz = (CD.T0SZ.get(w0), CD.T1SZ.get(w0))
        epd = (CD.EPD0.test(w0), CD.EPD1.test(w0))
        for sz, disabled in zip(tsz, epd, strict=True):
            # A half disabled by EPDx never walks, so its TxSZ is not checked (Linux leaves T1SZ 0).
            if not disabled and not CD_TXSZ_MIN <= sz <= CD_TXSZ_MAX:
                raise _Fault(
                    EventId.C_BAD_CD, f"CD TxSZ {sz} outside [{CD_TXSZ_MIN}, {CD_TXSZ_MAX}]"
                )
        tg0, tg1 = CD.TG0.get(w0), CD.TG1.get(w0)
        if (not epd[0] and tg0 not in TG0_PAGE_SHIFT) or (not epd[1] and tg1 not in TG1_PAGE_SHIFT):
            raise _Fault(EventId.C_BAD_CD, f"CD TG0 {tg0} / TG1 {tg1} reserved")
        # IPS 0b111 is reserved and behaves as 0b110 (52 bits) in SMMUv3.1-3.3 (§5.4 IPS).
        ips = min(CD.IPS.get(w0), _IPS_52)
        oa_bits = OAS_BITS[ips]
        ttb = (CD.TTB0.get(words[1]), CD.TTB1.get(words[2]))
        for half in (0, 1):
            # A TTBx outside the effective IPS makes the CD ILLEGAL: C_BAD_CD, not an Address
            # Size fault (IHI 0070 §3.4, §5.4 TTB0/TTB1).
            if not epd[half] and ttb[half] >> oa_bits:
                raise _Fault(EventId.C_BAD_CD, f"CD TTB{half} {ttb[half]:#x} beyond the "
                             f"{oa_bits}-bit IPS")
        return CdConfig(
            asid=CD.ASID.get(w0),
            ttb=ttb,
            tsz=tsz,
            shift=(
                TG0_PAGE_SHIFT.get(tg0, TLB_PAGE_SHIFT),
                TG1_PAGE_SHIFT.get(tg1, TLB_PAGE_SHIFT),
            ),
            epd=epd,
            oa_bits=oa_bits,
            affd=CD.AFFD.test(w0),
        )

    def _stage1(
        self, ioas: SimIoas, cd: CdConfig, iova: int, write: bool, vmid: int | None = None
    ) -> tuple[int, int, int, bool]:
        """Walk stage 1: return (leaf VA base, leaf size, output IPA, writable).

        With ``vmid`` the walk goes through the walk cache: it starts at the cached
        last-level table of ``iova`` and records the one it ends in.  Without, it reads
        every level afresh (the stale-cache check's walk).
        """
        if not cd.epd[0] and iova >> (VA_BITS - cd.tsz[0]) == 0:
            half = 0
        elif not cd.epd[1] and iova >> (VA_BITS - cd.tsz[1]) == (1 << cd.tsz[1]) - 1:
            half = 1
        elif iova >> (VA_BITS - max(cd.tsz[0], CD_TXSZ_MIN)) == 0:
            half = 0
        else:
            raise _Fault(EventId.F_TRANSLATION, f"VA {iova:#x} in neither TTB0 nor TTB1 range",
                         event_class=int(EventClass.IN), input_addr=iova)
        if cd.epd[half]:
            raise _Fault(EventId.F_TRANSLATION, f"VA {iova:#x}: EPD{half}=1",
                         event_class=int(EventClass.IN), input_addr=iova)
        ia_bits = VA_BITS - cd.tsz[half]
        granule: Granule = GRANULES_BY_SHIFT[cd.shift[half]]
        level = granule.start_level(ia_bits)
        table = cd.ttb[half]
        walk_key = None
        if vmid is not None:
            walk_key = (vmid, cd.asid, iova >> granule.level_shift(MAX_LEVEL - 1))
            cached = self.walk_cache.get(walk_key)
            if cached is not None:
                table, level = cached, MAX_LEVEL
        oa_limit = 1 << cd.oa_bits
        oa_52 = cd.oa_bits > OA_BITS
        lookup = ioas.lookup
        while True:
            desc_ipa = table + granule.index(iova, level, ia_bits) * DESCRIPTOR_SIZE
            m = lookup(desc_ipa)
            if m is None:  # the slow path raises the stage-2 fault with its fields
                self._read_ipa(ioas, desc_ipa, DESCRIPTOR_SIZE, EventClass.TT, iova)
                raise AssertionError("unreachable: stage 2 of an unmapped IPA")
            off = desc_ipa - m.iova
            desc = _U64_FROM(m.mapping.view()[off : off + DESCRIPTOR_SIZE], "little")
            kind = classify(desc, level, granule)
            if kind is _INVALID:
                raise _level_fault(EventId.F_TRANSLATION, "invalid", level, desc, desc_ipa, iova)
            if kind is _RESERVED:
                raise _level_fault(EventId.F_TRANSLATION, "reserved here", level, desc,
                                   desc_ipa, iova)
            out = output_address(desc, level, granule, oa_52=oa_52)
            if out >= oa_limit:
                raise _level_fault(EventId.F_ADDR_SIZE, "address beyond IPS", level, desc,
                                   desc_ipa, iova)
            if kind is _TABLE:
                table = out
                level += 1
                continue
            if not DESC.AF.test(desc) and not cd.affd:
                raise _level_fault(EventId.F_ACCESS, "AF=0", level, desc, desc_ipa, iova)
            ap = DESC.AP.get(desc)
            if ap != _AP_RW_ANY and ap != _AP_RO_ANY:
                raise _level_fault(EventId.F_PERMISSION, "no unprivileged access", level, desc,
                                   desc_ipa, iova)
            writable = ap == _AP_RW_ANY
            if write and not writable:
                raise _level_fault(EventId.F_PERMISSION, "read-only", level, desc, desc_ipa,
                                   iova)
            if walk_key is not None and level == MAX_LEVEL:
                walk_cache = self.walk_cache
                if len(walk_cache) >= WALK_CACHE_CAPACITY:
                    walk_cache.clear()
                walk_cache[walk_key] = table
            leaf_size = 1 << granule.level_shift(level)
            leaf_base = iova & ~(leaf_size - 1)
            return leaf_base, leaf_size, out | (iova & (leaf_size - 1)), writable

    def _report(self, dev: SimDevice, iova: int, write: bool, fault: _Fault) -> DmaFault:
        fields = dict(fault.fields)
        klass = fields.pop("event_class", None)
        if fault.event_id in (EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS,
                              EventId.F_PERMISSION):
            fields.setdefault("input_addr", iova)
            fields["rnw"] = 0 if write else 1
            if klass is not None:
                fields["class"] = klass
        vdev = dev.vdev
        forward = vdev is not None and fault.event_id in FORWARDED_EVENTS \
            and not fields.get("s2", 0)
        sid = vdev.virt_id if forward and vdev is not None else dev.stream_id
        raw = encode_event(fault.event_id, sid=sid & EVT.SID.mask, **fields)
        event = decode_event(raw)
        delivered = False
        if forward and vdev is not None:
            delivered = self._report_event(vdev.viommu, raw)
        if not delivered:
            self.host_events.append(event)
            log.warning("host SMMU event for dev %d (SID %#x): %s (%s)", dev.id, dev.stream_id,
                        event, fault)
        return DmaFault(f"DMA {'write' if write else 'read'} at {iova:#x}: {event}: {fault}",
                        event, delivered)
