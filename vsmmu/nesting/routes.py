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

import dataclasses

from vsmmu.arch.events import Event
from vsmmu.iommufd.backend import DeviceDma, IommufdBackend
from vsmmu.smmu import SteLookup, SteStatus

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
