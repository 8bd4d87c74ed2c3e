"""What the nesting translator keeps: its streams, nested HWPTs, guest objects, observer hooks.

:class:`Stream` is one endpoint at a guest StreamID with its iommufd device,
what is installed for it (vSTE, nested HWPT or GBPA attachment) and its
:class:`~vsmmu.nesting.routes.Route`; :class:`GuestObjects` are the iommufd
objects that exist while the guest has the SMMU enabled; a
:class:`TranslatorObserver` hears what the translator did.
"""

from __future__ import annotations

import dataclasses

from vsmmu.arch.events import Event
from vsmmu.iommufd.backend import IommufdError, VeventqHandle
from vsmmu.nesting.routes import UNCONFIGURED, Route
from vsmmu.nesting.vste import VsteWords
from vsmmu.smmu import SteLookup


class TranslatorObserver:
    """Hears what the translator did, for QMP events and statistics (no-op by default)."""

    def event_recorded(self, event: Event, written: bool, origin: str) -> None:
        """A record was offered to the guest event queue (``written``: it fit)."""

    def event_overflow(self, origin: str) -> None:
        """The guest event queue was flagged as overflowed."""

    def hwpt_allocated(self, sid: int, vste: VsteWords, hwpt_id: int | None,
                       error: IommufdError | None) -> None:
        """A nested HWPT was allocated for ``sid`` (``error`` set when it failed)."""


@dataclasses.dataclass
class NestedHwpt:
    """A nested HWPT the translator allocated: its vSTE and the streams attached to it."""

    id: int
    vste: VsteWords
    users: set[int] = dataclasses.field(default_factory=set)
    proxy: bool = False


@dataclasses.dataclass
class Stream:
    """One endpoint's StreamID, its iommufd device, and what is installed for it."""

    sid: int
    name: str
    dev_id: int
    vdev_id: int | None = None
    lookup: SteLookup | None = None
    vste: VsteWords | None = None
    hwpt: NestedHwpt | None = None
    on_ioas: bool = False
    error: str = ""
    route: Route = UNCONFIGURED
    """Where its transactions go (:mod:`vsmmu.nesting.routes`), kept current by the translator."""

    @property
    def attachment(self) -> str:
        """What the device is attached to, in words."""
        if self.hwpt is not None:
            return f"nested HWPT {self.hwpt.id}"
        return "IOAS (GBPA bypass)" if self.on_ioas else "nothing (blocked)"


@dataclasses.dataclass
class GuestObjects:
    """The iommufd objects that exist while the guest has the SMMU enabled."""

    s2_hwpt: int | None = None
    viommu: int | None = None
    veventq: VeventqHandle | None = None
    hwpts: dict[VsteWords, NestedHwpt] = dataclasses.field(default_factory=dict)
    vdevices: list[int] = dataclasses.field(default_factory=list)
