"""The sim's iommufd objects, one class per ``enum iommufd_object_type``.

Each object's kind is a class attribute (:attr:`SimObject.type`).  A back
reference that exists for the object's whole life (a HWPT's IOAS, a vIOMMU's
parent, a vDEVICE's device) is a plain required field; only links that come
and go (a device's attached HWPT, a vIOMMU's vEVENTQ) are Optional.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping, IommufdError, ObjType
from vsmmu.iommufd.veventq import SimVeventQueue

log = logging.getLogger(__name__)


def sim_error(err: int, op: str, message: str, handled: int = 0) -> IommufdError:
    """The IommufdError the sim raises for ``op`` (logged at debug level)."""
    log.debug("iommufd sim %s -> %s: %s", op, errno.errorcode.get(err, err), message)
    return IommufdError(err, op, message, handled=handled)


@dataclass(eq=False)
class SimObject:
    """An iommufd object of the sim; ``users`` counts what depends on it."""

    type: ClassVar[ObjType]

    id: int
    users: int = field(default=0, kw_only=True)

    def detail(self) -> dict[str, int | str | None]:
        """Object-specific fields for the object table."""
        return {}


@dataclass(eq=False)
class IoasMap:
    """One IOAS mapping: ``[iova, iova + length)`` → ``mapping``."""

    iova: int
    length: int
    mapping: HostMapping
    flags: uapi.IoasMapFlags
    page_offset: int = 0
    """The user address's offset in its page (the area's page_offset)."""


@dataclass(eq=False)
class SimIoas(SimObject):
    """An IO address space: the stage-2 (IPA → host memory) of the nesting."""

    type: ClassVar[ObjType] = ObjType.IOAS
    maps: list[IoasMap] = field(default_factory=list)

    def lookup(self, iova: int) -> IoasMap | None:
        """The mapping containing ``iova``, or None."""
        for m in self.maps:
            if m.iova <= iova < m.iova + m.length:
                return m
        return None

    def detail(self) -> dict[str, int | str | None]:
        return {"mappings": len(self.maps)}


@dataclass(eq=False)
class SimHwptPaging(SimObject):
    """A kernel-managed HWPT (stage 2 of its IOAS), possibly a nest parent."""

    type: ClassVar[ObjType] = ObjType.HWPT_PAGING
    ioas: SimIoas
    vmid: int
    nest_parent: bool = False
    auto: bool = False
    aperture_last: int = uapi.ULONG_MAX
    """The last IOVA the domain translates (its geometry's aperture_end)."""

    def detail(self) -> dict[str, int | str | None]:
        return {"ioas": self.ioas.id, "nest_parent": int(self.nest_parent), "vmid": self.vmid}


@dataclass(eq=False)
class SimViommu(SimObject):
    """A vIOMMU on a nest-parent HWPT (carries the VMID)."""

    type: ClassVar[ObjType] = ObjType.VIOMMU
    parent: SimHwptPaging
    vdevs: dict[int, SimVdevice] = field(default_factory=dict)
    veventqs: dict[int, SimVeventq] = field(default_factory=dict)
    """Its vEVENTQs by type: one of each (iommufd_viommu_find_veventq)."""

    @property
    def vmid(self) -> int:
        """The VMID of the S2 parent (the kernel takes the parent's)."""
        return self.parent.vmid

    def detail(self) -> dict[str, int | str | None]:
        return {"hwpt": self.parent.id, "vmid": self.vmid, "vdevices": len(self.vdevs)}


@dataclass(eq=False)
class SimHwptNested(SimObject):
    """A user-managed nested HWPT: the validated vSTE on a vIOMMU."""

    type: ClassVar[ObjType] = ObjType.HWPT_NESTED
    viommu: SimViommu
    ste: tuple[int, int] = (0, 0)
    enable_ats: bool = False

    def detail(self) -> dict[str, int | str | None]:
        return {
            "viommu": self.viommu.id,
            "ste0": f"{self.ste[0]:#018x}",
            "ste1": f"{self.ste[1]:#018x}",
        }


@dataclass(eq=False)
class SimDevice(SimObject):
    """A mock device bound to the sim (one physical StreamID)."""

    type: ClassVar[ObjType] = ObjType.DEVICE
    stream_id: int = 0
    hwpt: SimHwptPaging | SimHwptNested | None = None
    vdev: SimVdevice | None = None
    name: str = ""

    def detail(self) -> dict[str, int | str | None]:
        return {
            "name": self.name,
            "sid": self.stream_id,
            "hwpt": self.hwpt.id if self.hwpt else None,
            "vsid": self.vdev.virt_id if self.vdev else None,
        }


@dataclass(eq=False)
class SimVdevice(SimObject):
    """A vDEVICE: ``device`` seen by ``viommu`` as virtual StreamID ``virt_id``."""

    type: ClassVar[ObjType] = ObjType.VDEVICE
    viommu: SimViommu
    device: SimDevice
    virt_id: int

    def detail(self) -> dict[str, int | str | None]:
        return {"viommu": self.viommu.id, "dev": self.device.id, "virt_id": self.virt_id}


@dataclass(eq=False)
class SimVeventq(SimObject):
    """A vEVENTQ object; the queue itself is :class:`SimVeventQueue`."""

    type: ClassVar[ObjType] = ObjType.VEVENTQ
    viommu: SimViommu
    queue: SimVeventQueue
    queue_type: int = uapi.VeventqType.ARM_SMMUV3

    def detail(self) -> dict[str, int | str | None]:
        q = self.queue
        return {
            "viommu": self.viommu.id,
            "depth": q.depth,
            "fd": q.reader_fd,
            "delivered": q.delivered,
            "lost": q.lost,
        }
