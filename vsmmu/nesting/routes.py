"""Where a StreamID's transactions go: decided when configuration changes, looked up per access.

Hardware caches a decoded STE; the translator caches, per endpoint stream, the
:class:`Route` its transactions take, and :func:`decide` is the one place that
decides it.  The translator calls it when the route can change — the guest's
STE re-read by a CFGI, the SMMU enabled or disabled or reset, an endpoint
added — and each DMA only looks the answer up.  (GBPA needs no route of its
own: it decides what the host device is attached to, and the host acts on it.)

A route is one of:

* **the host**: the backend's DMA capability for the endpoint's device
  (:class:`~vsmmu.iommufd.backend.DeviceDma`); the host SMMU translates as
  the translator configured it (nested HWPT, proxies, GBPA attachment) and
  reports faults through the vEVENTQ;
* **the guest's event**: the guest's stream table refuses the transaction
  before any host sees it (a StreamID beyond the table, an STE fetch abort,
  or any STE of a StreamID with no endpoint), with the event the lookup names;
* **refused**, with the reason: no endpoint while the SMMU is off, or a
  backend whose devices do their own DMA (real devices on the kernel).

Also here: the outcome of one transaction (:class:`TransactionResult`), the
error an endpoint's refused DMA raises (:class:`StreamFault`) and the nesting
layer's error base (:class:`NestingError`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Protocol

from vsmmu.arch.events import Event
from vsmmu.iommufd.backend import DeviceDma, DmaFault, IommufdBackend, IommufdError
from vsmmu.smmu import SmmuV3, SteLookup, SteStatus

HOST_ACTS_ON = frozenset({SteStatus.INVALID, SteStatus.ILLEGAL, SteStatus.VALID})
"""Guest STE states of an endpoint the host acts on: the translator installs a vSTE for each
(an invalid or ILLEGAL one as V=0, which the host reports as C_BAD_STE itself)."""


class NestingError(Exception):
    """A caller misused the translator (never raised for guest-controlled data), or an
    endpoint's DMA was refused (:class:`StreamFault`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Where one StreamID's transactions go (module docstring).

    ``dma`` is set for the host route; otherwise ``lookup`` (the guest STE
    lookup whose event the transaction records) or only ``reason``.
    """

    dma: DeviceDma | None = None
    lookup: SteLookup | None = None
    reason: str = ""


UNCONFIGURED = Route(reason="not configured yet")
"""The route of a stream the translator has not decided yet (it refuses every access)."""


def decide(backend: IommufdBackend, dev_id: int | None, lookup: SteLookup | None) -> Route:
    """The route of a StreamID.

    ``dev_id`` is its endpoint's iommufd device (None: no endpoint there);
    ``lookup`` its guest STE while the SMMU is enabled (None: disabled).
    """
    if lookup is not None and (dev_id is None or lookup.status not in HOST_ACTS_ON):
        status = lookup.status
        reason = ("no endpoint at this StreamID" if status is SteStatus.VALID
                  else f"guest STE: {status.value}")
        return Route(lookup=lookup, reason=reason)
    if dev_id is None:
        return Route(reason="SMMU disabled and no endpoint at this StreamID")
    dma = backend.device_dma(dev_id)
    if dma is None:
        return Route(reason=f"the {backend.name} backend cannot issue DMA (its devices do "
                            "their own)")
    return Route(dma=dma)


@dataclasses.dataclass(frozen=True)
class TransactionResult:
    """The outcome of one transaction from a StreamID (endpoint DMA or injected)."""

    sid: int
    iova: int
    write: bool
    ok: bool
    data: bytes = b""
    event: Event | None = None
    reason: str = ""


class StreamFault(NestingError):
    """An endpoint's DMA was refused; ``result`` says why and which event it raised."""

    def __init__(self, result: TransactionResult) -> None:
        super().__init__(f"DMA {'write' if result.write else 'read'} by SID {result.sid:#x} at "
                         f"IOVA {result.iova:#x} refused: {result.reason}")
        self.result = result


class RoutedStream(Protocol):
    """What routing needs of an endpoint stream (:class:`vsmmu.nesting.state.Stream`)."""

    sid: int
    dev_id: int
    lookup: SteLookup | None
    route: Route


class RoutedTransactions(abc.ABC):
    """The per-access half of the translator: every transaction follows its stream's route.

    The translator keeps each endpoint :class:`~vsmmu.nesting.state.Stream`'s
    ``route`` current through :meth:`_reroute`; the DMA methods only look it
    up (one dict lookup and the call), so the endpoints' data path costs
    nothing for deciding.
    """

    backend: IommufdBackend
    _streams: Mapping[int, RoutedStream]
    _smmu: SmmuV3 | None

    @property
    @abc.abstractmethod
    def smmu(self) -> SmmuV3:
        """The bound model (NestingError before it is bound)."""

    @abc.abstractmethod
    def record_event(self, record: bytes, origin: str) -> bool:
        """Write an event record to the guest event queue."""

    @abc.abstractmethod
    def drain_veventq(self) -> int:
        """Read the host's vEVENTQ into the guest event queue."""

    def _reroute(self, stream: RoutedStream) -> None:
        """Decide ``stream``'s route again (its STE, the enable state or its device changed)."""
        smmu = self._smmu
        lookup = None
        if smmu is not None and smmu.enabled:
            lookup = stream.lookup if stream.lookup is not None else smmu.lookup_ste(stream.sid)
        stream.route = decide(self.backend, stream.dev_id, lookup)

    def _reroute_all(self) -> None:
        for stream in self._streams.values():
            self._reroute(stream)

    def _route(self, sid: int) -> Route:
        """The route of ``sid``: an endpoint's as kept, any other's from the stream table now."""
        stream = self._streams.get(sid)
        if stream is not None:
            return stream.route
        smmu = self.smmu
        return decide(self.backend, None, smmu.lookup_ste(sid) if smmu.enabled else None)

    def transaction(self, sid: int, iova: int, *, write: bool = False, length: int = 4,
                    data: bytes | None = None, ssid: int | None = None) -> TransactionResult:
        """One transaction from ``sid`` as the physical SMMU would see it (module policy).

        It takes the StreamID's route (:mod:`vsmmu.nesting.routes`): through the
        backend's DMA for an endpoint the host acts on, else refused with the
        guest event its STE names.  Events land in the guest event queue before
        this returns.  Never raises for guest data.
        """
        route = self._route(sid)
        dma = route.dma
        if dma is None:
            return self._guest_refused(sid, route, iova, write, ssid)
        try:
            if write:
                dma.write(iova, data if data is not None else bytes(length))
                return TransactionResult(sid, iova, write, True)
            return TransactionResult(sid, iova, write, True, data=dma.read(iova, length))
        except (DmaFault, IommufdError) as exc:
            return self._host_refused(sid, iova, write, exc)

    def dma_read(self, sid: int, iova: int, length: int) -> bytes:
        """An endpoint's DMA read. Raises StreamFault when refused."""
        stream = self._streams.get(sid)
        dma = stream.route.dma if stream is not None else None
        if dma is None:
            raise StreamFault(self._guest_refused(sid, self._route(sid), iova, False, None))
        try:
            return dma.read(iova, length)
        except (DmaFault, IommufdError) as exc:
            raise StreamFault(self._host_refused(sid, iova, False, exc)) from None

    def dma_write(self, sid: int, iova: int, data: bytes) -> None:
        """An endpoint's DMA write. Raises StreamFault when refused."""
        stream = self._streams.get(sid)
        dma = stream.route.dma if stream is not None else None
        if dma is None:
            raise StreamFault(self._guest_refused(sid, self._route(sid), iova, True, None))
        try:
            dma.write(iova, data)
        except (DmaFault, IommufdError) as exc:
            raise StreamFault(self._host_refused(sid, iova, True, exc)) from None

    def dma_views(self, sid: int, iova: int, length: int, write: bool) -> list[memoryview]:
        """An endpoint's zero-copy DMA: host views of the whole translated range.

        Routed as :meth:`transaction` routes an access; nothing is returned
        unless every page is allowed.  Raises StreamFault when refused.
        """
        stream = self._streams.get(sid)
        dma = stream.route.dma if stream is not None else None
        if dma is None:
            raise StreamFault(self._guest_refused(sid, self._route(sid), iova, write, None))
        try:
            return dma.views(iova, length, write)
        except (DmaFault, IommufdError) as exc:
            raise StreamFault(self._host_refused(sid, iova, write, exc)) from None

    def _guest_refused(self, sid: int, route: Route, iova: int, write: bool,
                 ssid: int | None) -> TransactionResult:
        """A transaction its route refuses before any host: the guest's event, recorded."""
        event = route.lookup.event(ssid) if route.lookup is not None else None
        if event is not None:
            self.record_event(event.encode(), "transaction")
        return TransactionResult(sid, iova, write, False, event=event, reason=route.reason)

    def _host_refused(self, sid: int, iova: int, write: bool,
                      exc: DmaFault | IommufdError) -> TransactionResult:
        """A transaction the host refused: its event (through the vEVENTQ) is drained first."""
        if isinstance(exc, DmaFault):
            self.drain_veventq()
            return TransactionResult(sid, iova, write, False, event=exc.event, reason=str(exc))
        return TransactionResult(sid, iova, write, False, reason=str(exc))
