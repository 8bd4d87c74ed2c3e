"""The nesting translator: the vSMMU's configuration sink, talking iommufd.

:class:`NestingTranslator` is the :class:`vsmmu.smmu.ConfigSink` of one
:class:`vsmmu.smmu.SmmuV3`.  It turns what the guest configures into iommufd
objects on an :class:`vsmmu.iommufd.backend.IommufdBackend`, and what the host
reports back into guest event-queue records (DESIGN.md §3).

Objects and their lives
    * **connection objects** live as long as the translator: the IOAS whose
      mappings mirror guest RAM (:meth:`map_guest_ram` / :meth:`unmap_guest_ram`,
      fed by the SMMU function's DMA_MAP/DMA_UNMAP), and the endpoints'
      iommufd devices (bound by the service, registered with :meth:`add_endpoint`);
    * **guest objects** exist only while the guest has CR0.SMMUEN set: the
      stage-2 nest-parent HWPT on the IOAS, the vIOMMU on it, the vEVENTQ
      (depth = the guest event queue's size), the abort and bypass proxy
      HWPTs, one vDEVICE per endpoint (virt_id = the guest StreamID, allocated
      before the first nested attach) and the nested HWPTs, one per distinct
      vSTE, shared by every stream with that vSTE.  SMMU disable and device
      reset destroy every one of them (:meth:`guest_object_ids` is then empty).

While the SMMU is disabled an endpoint follows GBPA: ABORT=1 → detached (DMA
blocked, no event), ABORT=0 → attached to the IOAS itself (stage 2 only:
IOVA = guest physical address).  The kernel-owned HWPT that attach creates is
not a guest object.

Commands
    * CFGI_STE / CFGI_STE_RANGE / CFGI_ALL (:meth:`ste_changed`): the guest
      STE of every endpoint in range is re-read, its vSTE built
      (:func:`vsmmu.nesting.vste.vste_for`), the nested HWPT for that vSTE
      found or allocated, the device attached to it and the previous HWPT
      released (destroyed when no stream uses it and it is not a proxy).  What
      happens when the host refuses is :mod:`vsmmu.nesting.policy`.
    * CFGI_CD(_ALL), TLBI_NH_*, TLBI_NSNH_ALL, ATC_INV (:meth:`invalidate`): one
      ``IOMMU_HWPT_INVALIDATE`` on the vIOMMU per batch, raw commands as the
      entries; a failure at entry k returns k, and the model stops the guest's
      queue with CERROR_ILL at exactly that command.  With no vIOMMU (SMMU
      disabled, nothing to nest) every invalidation succeeds: nothing is cached.

Events
    The vEVENTQ fd is read on the event loop (``loop.add_reader``) when a loop
    is given, or by calling :meth:`drain_veventq`.  Each record's event (the
    host already put the vSID in it) is written to the guest event queue; a
    LOST_EVENTS header becomes the guest queue's overflow flag.

Transactions
    Each endpoint stream keeps its :class:`~vsmmu.nesting.routes.Route`,
    decided by :func:`vsmmu.nesting.routes.decide` whenever its STE is re-read,
    the SMMU is enabled, disabled or reset, or the endpoint is added; an
    endpoint's DMA (:meth:`dma_read`, :meth:`dma_write`, :meth:`dma_views`) and
    an injected :meth:`transaction` only follow it: the backend's DMA
    capability (the host SMMU translates; its faults come back through the
    vEVENTQ), or the guest event the STE names.  The translator never asks
    which backend it has.

Errors never reach the guest as exceptions: every iommufd failure is logged
with the guest's StreamID and becomes the guest-visible outcome documented
here; :class:`NestingError` is raised only for caller mistakes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Sequence

from vsmmu.arch.events import EventId, decode_event, encode_event
from vsmmu.arch.registers import QUEUE_BASE
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import (
    HostMapping,
    IommufdBackend,
    IommufdError,
)
from vsmmu.iommufd.veventq import parse_vevent_records
from vsmmu.nesting.policy import CBadStePolicy
from vsmmu.nesting.routes import NestingError, RoutedTransactions
from vsmmu.nesting.state import GuestObjects, NestedHwpt, Stream, TranslatorObserver
from vsmmu.nesting.vste import ABORT_VSTE, BYPASS_VSTE, INVALID_VSTE, VsteWords, vste_for
from vsmmu.smmu import GbpaState, QueuedCommand, SmmuV3, SteStatus, StreamTableConfig

logger = logging.getLogger(__name__)

_VEVENTQ_READ_SIZE = 64 * (uapi.VEVENT_HEADER_SIZE + uapi.VEVENT_ARM_SMMUV3_SIZE)
_VALID = SteStatus.VALID


class NestingTranslator(RoutedTransactions):
    """The vSMMU's :class:`~vsmmu.smmu.ConfigSink` over an iommufd backend (module doc)."""

    def __init__(self, backend: IommufdBackend, *,
                 policy: CBadStePolicy = CBadStePolicy.EVENT,
                 observer: TranslatorObserver | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 trace: bool = False) -> None:
        self.backend = backend
        self.policy = policy
        self.observer = observer if observer is not None else TranslatorObserver()
        self.loop = loop
        self.trace = trace
        self.ioas = backend.ioas_alloc()
        self.nesting_error = ""
        """Why the last SMMU enable could not build the nesting objects ("" if it could)."""
        self.events_forwarded = 0
        self.invalidations = 0
        self._smmu: SmmuV3 | None = None
        self._ram: dict[int, HostMapping] = {}
        self._streams: dict[int, Stream] = {}
        self._guest: GuestObjects | None = None

    # ------------------------------------------------------------ wiring

    def bind(self, smmu: SmmuV3) -> None:
        """Attach the model this translator serves (the model was built with it as sink)."""
        self._smmu = smmu

    @property
    def smmu(self) -> SmmuV3:
        """The bound model. Raises NestingError before :meth:`bind`."""
        if self._smmu is None:
            raise NestingError("NestingTranslator: no SmmuV3 bound; call bind(smmu) first")
        return self._smmu

    def add_endpoint(self, sid: int, dev_id: int, name: str) -> Stream:
        """Register an endpoint's iommufd device at guest StreamID ``sid``.

        Raises NestingError if ``sid`` is taken.
        """
        if sid in self._streams:
            raise NestingError(f"StreamID {sid:#x}: already {self._streams[sid].name}; "
                               f"expected a free StreamID for {name}")
        stream = Stream(sid, name, dev_id)
        self._streams[sid] = stream
        if self._smmu is not None and self._guest is not None and self._guest.viommu:
            self._alloc_vdevice(stream)
            self._install(stream)
        else:
            self._follow_gbpa(stream, self._gbpa_abort())
        self._reroute(stream)
        return stream

    def remove_endpoint(self, sid: int) -> None:
        """Forget the endpoint at ``sid`` (its device is about to be unbound).

        The device is detached and its vDEVICE destroyed, so nothing the
        translator holds refers to it any more; no-op for an unknown ``sid``.
        """
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        self._detach(stream)
        if stream.vdev_id is not None:
            try:
                self.backend.destroy(stream.vdev_id)
            except IommufdError as exc:
                logger.error("SID %#x (%s): vDEVICE %d not destroyed: %s", sid, stream.name,
                             stream.vdev_id, exc)
            if self._guest is not None and stream.vdev_id in self._guest.vdevices:
                self._guest.vdevices.remove(stream.vdev_id)
            stream.vdev_id = None
        logger.info("SID %#x (%s): endpoint removed", sid, stream.name)

    def streams(self) -> list[Stream]:
        """The endpoint streams, by StreamID."""
        return [self._streams[sid] for sid in sorted(self._streams)]

    def stream(self, sid: int) -> Stream | None:
        """The endpoint stream at ``sid``, if any."""
        return self._streams.get(sid)

    @property
    def guest_objects(self) -> GuestObjects | None:
        """The guest objects while the SMMU is enabled and nesting was set up."""
        return self._guest

    def guest_object_ids(self) -> set[int]:
        """Ids of every iommufd object that exists for the guest's SMMU configuration."""
        guest = self._guest
        if guest is None:
            return set()
        ids = {hwpt.id for hwpt in guest.hwpts.values()} | set(guest.vdevices)
        ids |= {i for i in (guest.s2_hwpt, guest.viommu) if i is not None}
        if guest.veventq is not None:
            ids.add(guest.veventq.id)
        return ids

    # ------------------------------------------------------------ guest RAM

    def map_guest_ram(self, gpa: int, mapping: HostMapping) -> None:
        """Mirror a guest RAM range into the IOAS (stage 2: IPA ``gpa`` → ``mapping``)."""
        try:
            self.backend.ioas_map(self.ioas, mapping, iova=gpa)
        except IommufdError as exc:
            logger.error("guest RAM [%#x, %#x) not mapped for DMA: %s", gpa,
                         gpa + mapping.length, exc)
            return
        self._ram[gpa] = mapping
        logger.info("guest RAM [%#x, %#x) mapped into IOAS %d", gpa, gpa + mapping.length,
                    self.ioas)

    def unmap_guest_ram(self, gpa: int) -> None:
        """Remove the guest RAM range mapped at ``gpa`` from the IOAS (no-op if unknown)."""
        mapping = self._ram.pop(gpa, None)
        if mapping is None:
            return
        try:
            self.backend.ioas_unmap(self.ioas, gpa, mapping.length)
        except IommufdError as exc:
            logger.error("guest RAM at %#x not unmapped from IOAS %d: %s", gpa, self.ioas, exc)
        mapping.release()
        logger.info("guest RAM [%#x, %#x) unmapped", gpa, gpa + mapping.length)

    # ------------------------------------------------------------ ConfigSink

    def smmu_enable_changed(self, enabled: bool, stream_table: StreamTableConfig) -> None:
        """SMMUEN 0→1 builds the guest objects and installs every stream; 1→0 tears down."""
        if enabled:
            logger.info("guest enabled the SMMU (stream table at %#x, %d SIDs)",
                        stream_table.base, 1 << stream_table.log2size)
            self._build_guest_objects()
        else:
            logger.info("guest disabled the SMMU")
            self._teardown()
            self._follow_gbpa_all()
        self._reroute_all()

    def gbpa_changed(self, gbpa: GbpaState) -> None:
        """While the SMMU is disabled, endpoints follow GBPA.ABORT."""
        if self._smmu is not None and self.smmu.enabled:
            return
        logger.info("guest set GBPA.ABORT=%d: endpoints %s", gbpa.abort,
                    "blocked" if gbpa.abort else "bypass to guest RAM")
        self._follow_gbpa_all()

    def ste_changed(self, first_sid: int, last_sid: int) -> bool:
        """Re-install every endpoint stream in ``first_sid..last_sid``; False = CERROR_ILL."""
        if self._guest is None or self._guest.viommu is None:
            # Nothing to install (SMMU off, or the host refused nesting); the route follows
            # the STE all the same (its event, or the host, which blocks the device).
            for sid, stream in self._streams.items():
                if first_sid <= sid <= last_sid:
                    self._reroute(stream)
            return True
        ok = True
        if first_sid == last_sid:
            only = self._streams.get(first_sid)
            return self._install(only) if only is not None else True
        for sid, stream in self._streams.items():
            if first_sid <= sid <= last_sid:
                ok = self._install(stream) and ok
        return ok

    def invalidate(self, batch: Sequence[QueuedCommand]) -> int:
        """One HWPT_INVALIDATE on the vIOMMU for the whole batch; return how many succeeded."""
        guest = self._guest
        if guest is None or guest.viommu is None:
            return len(batch)
        self.invalidations += 1
        entries = [(c.dw0, c.dw1) for c in batch]
        try:
            return self.backend.hwpt_invalidate(guest.viommu, entries)
        except IommufdError as exc:
            handled = min(max(exc.handled, 0), len(batch))
            logger.warning("guest command %s refused by the host (%s): CERROR_ILL",
                           batch[handled] if handled < len(batch) else "?", exc)
        if handled:
            # The guest will see every command before the refused one as consumed (IHI 0070
            # §7.1), but the kernel's entry_num does not promise they ran:
            # arm_vsmmu_cache_invalidate drops the partly filled block of converted entries
            # that held them.  Invalidation is idempotent, so they run again.
            try:
                self.backend.hwpt_invalidate(guest.viommu, entries[:handled])
            except IommufdError as exc:
                logger.error("guest commands before the refused one, issued again, refused "
                             "by the host (%s): the host may hold stale translations", exc)
        return handled

    def sync(self) -> None:
        """Nothing to wait for: iommufd invalidation is synchronous."""

    def reset(self) -> None:
        """Device reset: every guest object destroyed, endpoints follow the reset GBPA."""
        logger.info("vSMMU reset: destroying every object created for the guest")
        self._teardown()
        self._follow_gbpa_all()
        self._reroute_all()

    # ------------------------------------------------------------ guest objects

    def _build_guest_objects(self) -> None:
        if self._guest is not None:
            self._teardown()
        self.nesting_error = ""
        streams = self.streams()
        if not streams:
            logger.info("no endpoint behind the vSMMU: no iommufd nesting objects needed")
            return
        # Off the IOAS before nesting: streams move to nested HWPTs below.
        for stream in streams:
            self._detach(stream)
        guest = self._guest = GuestObjects()
        be = self.backend
        dev = streams[0].dev_id
        try:
            guest.s2_hwpt = be.hwpt_alloc(dev, self.ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
            guest.viommu = be.viommu_alloc(dev, guest.s2_hwpt)
            guest.veventq = be.veventq_alloc(guest.viommu, self._veventq_depth())
            for vste in (ABORT_VSTE, BYPASS_VSTE):
                hwpt = NestedHwpt(be.hwpt_alloc(dev, guest.viommu, data=vste), vste, proxy=True)
                guest.hwpts[vste] = hwpt
        except IommufdError as exc:
            self.nesting_error = str(exc)
            logger.error("SMMU enable: the host refused nesting (%s); every endpoint's DMA is "
                         "blocked until the guest re-enables the SMMU", exc)
            self._teardown()
            return
        if self.loop is not None:
            self.loop.add_reader(guest.veventq.fd, self._on_veventq_readable)
        if self.trace:
            logger.info("iommufd: S2 HWPT %d, vIOMMU %d, vEVENTQ %d (fd %d), proxies %s",
                        guest.s2_hwpt, guest.viommu, guest.veventq.id, guest.veventq.fd,
                        [h.id for h in guest.hwpts.values()])
        for stream in streams:
            self._alloc_vdevice(stream)
        for stream in streams:
            self._install(stream)

    def _veventq_depth(self) -> int:
        smmu = self.smmu
        return 1 << min(QUEUE_BASE.LOG2SIZE.get(smmu.evtq_base), smmu.features.evtqs)

    def _alloc_vdevice(self, stream: Stream) -> None:
        guest = self._guest
        assert guest is not None and guest.viommu is not None
        try:
            stream.vdev_id = self.backend.vdevice_alloc(guest.viommu, stream.dev_id, stream.sid)
        except IommufdError as exc:
            stream.error = f"vDEVICE: {exc}"
            logger.error("SID %#x (%s): no vDEVICE: %s", stream.sid, stream.name, exc)
            return
        guest.vdevices.append(stream.vdev_id)

    def _teardown(self) -> None:
        guest = self._guest
        for stream in self._streams.values():
            self._detach(stream)
            stream.vdev_id = None
            stream.vste = None
            stream.lookup = None  # re-read when the SMMU is next enabled
        if guest is None:
            return
        self._guest = None
        be = self.backend
        doomed: list[int] = [h.id for h in guest.hwpts.values()]
        if guest.veventq is not None:
            if self.loop is not None:
                self.loop.remove_reader(guest.veventq.fd)
            doomed.append(guest.veventq.id)
        doomed += guest.vdevices
        doomed += [i for i in (guest.viommu, guest.s2_hwpt) if i is not None]
        if guest.veventq is not None:
            # The open fd holds the vEVENTQ (the kernel's DESTROY says EBUSY until it closes).
            os.close(guest.veventq.fd)
        for obj_id in doomed:
            try:
                be.destroy(obj_id)
            except IommufdError as exc:
                logger.error("iommufd object %d not destroyed: %s", obj_id, exc)
        if self.trace:
            logger.info("iommufd: destroyed guest objects %s", doomed)

    def _gbpa_abort(self) -> bool:
        return self._smmu is not None and self.smmu.gbpa_state().abort

    def _follow_gbpa_all(self) -> None:
        abort = self._gbpa_abort()
        for stream in self._streams.values():
            self._follow_gbpa(stream, abort)

    def _follow_gbpa(self, stream: Stream, abort: bool) -> None:
        if abort:
            self._detach(stream)
            return
        if stream.on_ioas:
            return
        try:
            self.backend.device_attach(stream.dev_id, self.ioas)
        except IommufdError as exc:
            stream.error = f"GBPA bypass attach: {exc}"
            logger.error("SID %#x (%s): bypass attach failed: %s", stream.sid, stream.name, exc)
            return
        stream.on_ioas = True

    def _detach(self, stream: Stream) -> None:
        if stream.hwpt is None and not stream.on_ioas:
            return
        try:
            self.backend.device_detach(stream.dev_id)
        except IommufdError as exc:
            logger.error("SID %#x (%s): detach failed: %s", stream.sid, stream.name, exc)
        self._release(stream)
        stream.on_ioas = False

    def _release(self, stream: Stream) -> None:
        old = stream.hwpt
        stream.hwpt = None
        if old is None:
            return
        old.users.discard(stream.sid)
        if old.users or old.proxy or self._guest is None:
            return
        try:
            self.backend.destroy(old.id)
        except IommufdError as exc:
            logger.error("nested HWPT %d not destroyed: %s", old.id, exc)
            return
        self._guest.hwpts.pop(old.vste, None)

    # ------------------------------------------------------------ stream install

    def _install(self, stream: Stream) -> bool:
        """Install the guest STE of ``stream``; False when the CFGI must fail (qemu-accel)."""
        lookup = self.smmu.lookup_ste(stream.sid)
        hwpt_now = stream.hwpt
        if (lookup is stream.lookup and lookup.status is _VALID and not stream.error
                and hwpt_now is not None and stream.vste is not None and self._guest is not None
                and self._guest.hwpts.get(stream.vste) is hwpt_now):
            # The model hands back the same lookup only for the same STE bytes at the same
            # place, so the vSTE is the one installed (no error: no fallback was put in its
            # place) and its HWPT is still the attached one. Nothing to redo.
            if self.trace:
                logger.info("SID %#x (%s): STE unchanged, vSTE %s stays on HWPT %d",
                            stream.sid, stream.name, stream.vste, hwpt_now.id)
            return True
        stream.lookup = lookup
        self._reroute(stream)
        stream.error = ""
        features = self.smmu.features
        vste = vste_for(lookup, substreams=features.ssidsize > 0, ats=features.ats)
        accepted = True
        if lookup.status is SteStatus.ILLEGAL:
            stream.error = f"guest STE ILLEGAL: {lookup.reason}"
            logger.info("SID %#x (%s): guest STE is ILLEGAL (%s)", stream.sid, stream.name,
                        lookup.reason)
            # Both policies install V=0 (transactions: C_BAD_STE); qemu-accel also fails the CFGI.
            accepted = self.policy is CBadStePolicy.EVENT
        hwpt: NestedHwpt | None
        try:
            hwpt = self._hwpt_for(stream.sid, vste)
        except IommufdError as exc:
            stream.error = f"HWPT_ALLOC: {exc}"
            vste, accepted, hwpt = self._refused(stream, vste, exc)
        if hwpt is None:
            self._detach(stream)
            return accepted
        if stream.hwpt is not hwpt:
            try:
                self.backend.device_attach(stream.dev_id, hwpt.id)
            except IommufdError as exc:
                stream.error = f"attach: {exc}"
                logger.error("SID %#x (%s): attach to nested HWPT %d failed: %s", stream.sid,
                             stream.name, hwpt.id, exc)
                self._detach(stream)
                self._drop_if_unused(hwpt)
                return accepted
            self._release(stream)
            hwpt.users.add(stream.sid)
            stream.hwpt = hwpt
            stream.on_ioas = False
        stream.vste = vste
        if self.trace:
            logger.info("SID %#x (%s): %s -> vSTE %s on HWPT %d", stream.sid, stream.name,
                        lookup.ste, vste, hwpt.id)
        return accepted

    def _refused(self, stream: Stream, vste: VsteWords,
                 exc: IommufdError) -> tuple[VsteWords, bool, NestedHwpt | None]:
        """The host refused ``vste``: apply the C_BAD_STE policy; return what to install."""
        if exc.errno == errno.EIO and self.policy is CBadStePolicy.EVENT:
            logger.warning("SID %#x (%s): host refused vSTE %s (%s): installing abort and "
                           "reporting C_BAD_STE", stream.sid, stream.name, vste, exc)
            fallback, accepted = INVALID_VSTE, True
            self.record_event(encode_event(EventId.C_BAD_STE, sid=stream.sid), "cbadste-policy")
        else:
            # qemu-accel: the CFGI_STE fails; any other errno is a host problem, not the
            # guest's, so the event policy keeps the queue running and only aborts.
            accepted = self.policy is CBadStePolicy.EVENT
            logger.warning("SID %#x (%s): host refused vSTE %s (%s): abort%s", stream.sid,
                           stream.name, vste, exc, "" if accepted else ", CERROR_ILL")
            fallback = ABORT_VSTE
        try:
            return fallback, accepted, self._hwpt_for(stream.sid, fallback)
        except IommufdError as again:
            logger.error("SID %#x (%s): even vSTE %s refused (%s): DMA blocked", stream.sid,
                         stream.name, fallback, again)
            return fallback, accepted, None

    def _hwpt_for(self, sid: int, vste: VsteWords) -> NestedHwpt:
        """The nested HWPT for ``vste``, allocated on first use. Raises IommufdError."""
        guest = self._guest
        assert guest is not None and guest.viommu is not None
        hwpt = guest.hwpts.get(vste)
        if hwpt is not None:
            return hwpt
        stream = self._streams[sid]
        try:
            hwpt_id = self.backend.hwpt_alloc(stream.dev_id, guest.viommu, data=vste)
        except IommufdError as exc:
            self.observer.hwpt_allocated(sid, vste, None, exc)
            raise
        hwpt = NestedHwpt(hwpt_id, vste)
        guest.hwpts[vste] = hwpt
        self.observer.hwpt_allocated(sid, vste, hwpt_id, None)
        logger.info("SID %#x (%s): nested HWPT %d for vSTE %s", sid, stream.name, hwpt_id, vste)
        return hwpt

    def _drop_if_unused(self, hwpt: NestedHwpt) -> None:
        if hwpt.users or hwpt.proxy or self._guest is None:
            return
        try:
            self.backend.destroy(hwpt.id)
        except IommufdError as exc:
            logger.error("nested HWPT %d not destroyed: %s", hwpt.id, exc)
            return
        self._guest.hwpts.pop(hwpt.vste, None)

    # ------------------------------------------------------------ events

    def record_event(self, record: bytes, origin: str) -> bool:
        """Write a 32-byte event record to the guest event queue and tell the observer."""
        written = self.smmu.record_event(record)
        self.observer.event_recorded(decode_event(record), written, origin)
        return written

    def _on_veventq_readable(self) -> None:
        try:
            self.drain_veventq()
        except Exception:
            # A reader callback must never take the event loop down.
            logger.exception("vEVENTQ drain failed")

    def drain_veventq(self) -> int:
        """Read every pending vEVENTQ record into the guest event queue; return how many."""
        guest = self._guest
        if guest is None or guest.veventq is None:
            return 0
        fd = guest.veventq.fd
        count = 0
        while True:
            try:
                data = self.backend.veventq_read(fd, _VEVENTQ_READ_SIZE)
            except IommufdError as exc:
                # A queue that cannot be read would wake the loop forever.
                logger.error("vEVENTQ fd %d read failed, no longer watched: %s", fd, exc)
                if self.loop is not None:
                    self.loop.remove_reader(fd)
                break
            if not data:  # drained: the kernel's read of an empty queue returns 0 bytes
                break
            count += self._parse_records(data)
        return count

    def deliver_vevents(self, data: bytes) -> int:
        """Handle ``[header][event]`` records as a vEVENTQ read returns them (fault
        injection hands its records in here); return how many events they held."""
        return self._parse_records(data)

    def _parse_records(self, data: bytes) -> int:
        records, used = parse_vevent_records(data)
        count = 0
        for record in records:
            if record.event is None:
                logger.warning("host vEVENTQ lost events: guest event queue overflow")
                self.smmu.signal_event_overflow()
                self.observer.event_overflow("veventq")
                continue
            self.events_forwarded += 1
            self.record_event(record.event, "veventq")
            count += 1
        if used < len(data):
            logger.error("vEVENTQ read: %d bytes after the last whole record", len(data) - used)
        return count

    # ------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Destroy every object this translator created (guest objects, then the IOAS)."""
        self._teardown()
        for stream in self._streams.values():
            self._detach(stream)
        for gpa in list(self._ram):
            self.unmap_guest_ram(gpa)
        try:
            self.backend.destroy(self.ioas)
        except IommufdError as exc:
            logger.error("IOAS %d not destroyed: %s", self.ioas, exc)
