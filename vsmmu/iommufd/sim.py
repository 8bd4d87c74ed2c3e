"""The simulated iommufd backend: a model of the host kernel plus the physical SMMU.

Objects follow ``drivers/iommu/iommufd`` and ``arm-smmu-v3-iommufd.c``:

* ids start at 1 and the lowest free id is reused (an xarray ``xa_alloc``);
* each object counts its ``users`` (objects depending on it and attached
  devices); ``destroy`` of an object in use is ``EBUSY``, of an unknown id
  ``ENOENT``;
* errno per ioctl is chosen where the kernel chooses it (the comments name
  the kernel check each branch mirrors).

Devices are *mock devices* created by the service for its emulated endpoints
(:meth:`SimIommufd.create_mock_device`), each with a physical StreamID.  The
host is described by a :class:`HostPersonality`, so "the host rejects EATS"
or "the host has no nesting" is configuration.

DMA of emulated endpoints goes through :meth:`SimIommufd.dma_read` /
:meth:`SimIommufd.dma_write`, translated by :mod:`vsmmu.iommufd.walk` (see
its docstring for the stage-1/stage-2 walk, the IOTLB and the fault policy).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vsmmu.arch.ste import STE, Eats, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import (
    HostMapping,
    HwInfo,
    InvalidationCommand,
    IommufdBackend,
    IommufdError,
    ObjectInfo,
    ObjType,
    VeventqHandle,
    Vste,
)
from vsmmu.iommufd.veventq import SimVeventQueue
from vsmmu.iommufd.walk import TLB_PAGE_MASK, TLB_PAGE_SHIFT, TLB_PAGE_SIZE

log = logging.getLogger(__name__)

# arm-smmu-v3.h STRTAB_STE_0_NESTING_ALLOWED / STRTAB_STE_1_NESTING_ALLOWED:
# the vSTE fields a guest may set (kernel policy, built from the arch fields).
STE_0_NESTING_ALLOWED = (
    STE.V.inplace_mask
    | STE.CONFIG.inplace_mask
    | STE.S1FMT.inplace_mask
    | STE.S1CONTEXTPTR.inplace_mask
    | STE.S1CDMAX.inplace_mask
)
STE_1_NESTING_ALLOWED = (
    STE.S1DSS.inplace_mask
    | STE.S1CIR.inplace_mask
    | STE.S1COR.inplace_mask
    | STE.S1CSH.inplace_mask
    | STE.S1STALLD.inplace_mask
    | STE.EATS.inplace_mask
)

PAGE_SIZE = 4096
"""The host's PAGE_SIZE: IOAS_MAP/UNMAP alignment (out_iova_alignment)."""


@dataclass(frozen=True)
class HostPersonality:
    """What the simulated host kernel and physical SMMU support.

    ``nesting``: ARM_SMMU_FEAT_NESTING (NEST_PARENT HWPTs and vIOMMUs);
    ``ats_in_nested``: a vSTE with EATS≠0 is accepted (False models the first
    nesting series, where any EATS≠0 made HWPT_ALLOC fail with EIO);
    ``s2fwb`` / ``canwbs``: without either the kernel refuses a vIOMMU;
    ``range_invalidation``: IDR3.RIL reported; ``idr``/``iidr``/``aidr``: the
    ID registers GET_HW_INFO returns.
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


@dataclass(eq=False)
class SimObject:
    """An iommufd object of the sim; ``users`` counts what depends on it."""

    id: int
    users: int = 0

    type: ObjType = dataclasses.field(init=False, default=ObjType.IOAS)

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


@dataclass(eq=False)
class SimIoas(SimObject):
    """An IO address space: the stage-2 (IPA → host memory) of the nesting."""

    maps: list[IoasMap] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.type = ObjType.IOAS

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

    ioas: SimIoas | None = None
    nest_parent: bool = False
    auto: bool = False
    vmid: int = 0

    def __post_init__(self) -> None:
        self.type = ObjType.HWPT_PAGING

    def detail(self) -> dict[str, int | str | None]:
        return {
            "ioas": self.ioas.id if self.ioas else None,
            "nest_parent": int(self.nest_parent),
            "vmid": self.vmid,
        }


@dataclass(eq=False)
class SimViommu(SimObject):
    """A vIOMMU on a nest-parent HWPT (carries the VMID)."""

    parent: SimHwptPaging | None = None
    vdevs: dict[int, SimVdevice] = field(default_factory=dict)
    veventq: SimVeventq | None = None

    def __post_init__(self) -> None:
        self.type = ObjType.VIOMMU

    @property
    def vmid(self) -> int:
        """The VMID of the S2 parent (the kernel takes the parent's)."""
        return self.parent.vmid if self.parent else 0

    def detail(self) -> dict[str, int | str | None]:
        return {
            "hwpt": self.parent.id if self.parent else None,
            "vmid": self.vmid,
            "vdevices": len(self.vdevs),
        }


@dataclass(eq=False)
class SimHwptNested(SimObject):
    """A user-managed nested HWPT: the validated vSTE on a vIOMMU."""

    viommu: SimViommu | None = None
    ste: tuple[int, int] = (0, 0)
    enable_ats: bool = False

    def __post_init__(self) -> None:
        self.type = ObjType.HWPT_NESTED

    def detail(self) -> dict[str, int | str | None]:
        return {
            "viommu": self.viommu.id if self.viommu else None,
            "ste0": f"{self.ste[0]:#018x}",
            "ste1": f"{self.ste[1]:#018x}",
        }


@dataclass(eq=False)
class SimDevice(SimObject):
    """A mock device bound to the sim (one physical StreamID)."""

    stream_id: int = 0
    hwpt: SimHwptPaging | SimHwptNested | None = None
    vdev: SimVdevice | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.type = ObjType.DEVICE

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

    viommu: SimViommu | None = None
    device: SimDevice | None = None
    virt_id: int = 0

    def __post_init__(self) -> None:
        self.type = ObjType.VDEVICE

    def detail(self) -> dict[str, int | str | None]:
        return {
            "viommu": self.viommu.id if self.viommu else None,
            "dev": self.device.id if self.device else None,
            "virt_id": self.virt_id,
        }


@dataclass(eq=False)
class SimVeventq(SimObject):
    """A vEVENTQ object; the queue itself is :class:`SimVeventQueue`."""

    viommu: SimViommu | None = None
    queue: SimVeventQueue | None = None

    def __post_init__(self) -> None:
        self.type = ObjType.VEVENTQ

    def detail(self) -> dict[str, int | str | None]:
        q = self.queue
        return {
            "viommu": self.viommu.id if self.viommu else None,
            "depth": q.depth if q else None,
            "fd": q.reader_fd if q else None,
            "delivered": q.delivered if q else None,
            "lost": q.lost if q else None,
        }


def _err(err: int, op: str, message: str, handled: int = 0) -> IommufdError:
    log.debug("iommufd sim %s -> %s: %s", op, errno.errorcode.get(err, err), message)
    return IommufdError(err, op, message, handled=handled)


def validate_vste(ste: Sequence[int], ats_in_nested: bool, op: str) -> tuple[tuple[int, int], bool]:
    """``arm_smmu_validate_vste``: return the stored vSTE words and ``enable_ats``.

    V=0 is accepted and zeroed; bits outside the nesting-allowed masks, a
    Config other than abort/bypass/S1-translate, or an EATS the host does not
    accept are EIO.  EATS is cleared from what is stored.
    """
    w0, w1 = ste[0], ste[1]
    if not STE.V.test(w0):
        return (0, 0), False
    if w0 & ~STE_0_NESTING_ALLOWED or w1 & ~STE_1_NESTING_ALLOWED:
        raise _err(
            errno.EIO,
            op,
            f"vSTE {w0:#018x} {w1:#018x} sets bits outside the nesting-allowed masks "
            f"{STE_0_NESTING_ALLOWED:#018x} {STE_1_NESTING_ALLOWED:#018x}",
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


class SimIommufd(IommufdBackend):
    """The simulated iommufd (see the module docstring)."""

    name = "sim"

    def __init__(self, personality: HostPersonality | None = None) -> None:
        self.personality = personality or HostPersonality()
        self._objects: dict[int, SimObject] = {}
        self._next_vmid = 1
        # The physical SMMU's translation machinery (IOTLB, config cache, walker).
        from vsmmu.iommufd.walk import PhysicalSmmu

        self.smmu = PhysicalSmmu(self)

    # --- object table ---

    def _alloc_id(self) -> int:
        i = 1
        while i in self._objects:
            i += 1
        return i

    def _add(self, obj: SimObject) -> SimObject:
        self._objects[obj.id] = obj
        log.info("iommufd sim: allocated %s %d", obj.type.value, obj.id)
        return obj

    def _get(self, obj_id: int, kinds: tuple[ObjType, ...], op: str, what: str) -> SimObject:
        obj = self._objects.get(obj_id)
        if obj is None or obj.type not in kinds:
            expected = "/".join(k.value for k in kinds)
            found = obj.type.value if obj else "nothing"
            raise _err(errno.ENOENT, op, f"{what} {obj_id}: expected a {expected}, found {found}")
        return obj

    def _device(self, dev_id: int, op: str) -> SimDevice:
        obj = self._get(dev_id, (ObjType.DEVICE,), op, "dev_id")
        assert isinstance(obj, SimDevice)
        return obj

    def objects(self) -> list[ObjectInfo]:
        """The object table, ordered by id."""
        return [
            ObjectInfo(o.id, o.type, o.users, o.detail())
            for o in sorted(self._objects.values(), key=lambda o: o.id)
        ]

    def object(self, obj_id: int) -> SimObject | None:
        """The sim object with this id (for the walker and for tests)."""
        return self._objects.get(obj_id)

    # --- devices ---

    def create_mock_device(self, stream_id: int, name: str = "") -> int:
        """Bind a mock device with physical StreamID ``stream_id``; return its dev_id."""
        dev = SimDevice(self._alloc_id(), stream_id=stream_id, name=name)
        self._add(dev)
        return dev.id

    def destroy_mock_device(self, dev_id: int) -> None:
        """Unbind a mock device (detaching it and destroying its vDEVICE first)."""
        dev = self._device(dev_id, "UNBIND")
        if dev.hwpt is not None:
            self.device_detach(dev_id)
        if dev.vdev is not None:
            self._destroy_obj(dev.vdev)
        del self._objects[dev_id]

    def hw_info(self, dev_id: int, data_type: int = uapi.HwInfoType.DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO``: the personality's ARM SMMUv3 ID registers."""
        op = "GET_HW_INFO"
        self._device(dev_id, op)
        # arm_smmu_hw_info: any type but DEFAULT/ARM_SMMUV3 needs impl ops we lack.
        if data_type not in (uapi.HwInfoType.DEFAULT, uapi.HwInfoType.ARM_SMMUV3):
            raise _err(errno.EOPNOTSUPP, op, f"data_type {data_type}: expected ARM_SMMUV3")
        p = self.personality
        info = uapi.IommuHwInfoArmSmmuv3()
        for i, value in enumerate(p.idr):
            info.idr[i] = value
        info.iidr = p.iidr
        info.aidr = p.aidr
        caps = uapi.HwCapabilities(0)
        return HwInfo(uapi.HwInfoType.ARM_SMMUV3, info.to_bytes(), caps, p.max_pasid_log2)

    # --- IOAS ---

    def ioas_alloc(self) -> int:
        """``IOMMU_IOAS_ALLOC``."""
        ioas = SimIoas(self._alloc_id())
        self._add(ioas)
        return ioas.id

    def _ioas(self, ioas_id: int, op: str) -> SimIoas:
        obj = self._get(ioas_id, (ObjType.IOAS,), op, "ioas_id")
        assert isinstance(obj, SimIoas)
        return obj

    def ioas_map(
        self,
        ioas_id: int,
        mapping: HostMapping,
        iova: int | None = None,
        flags: uapi.IoasMapFlags = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE,
    ) -> int:
        """``IOMMU_IOAS_MAP``: EINVAL for unaligned/empty, EEXIST for overlap."""
        op = "IOAS_MAP"
        if iova is not None:
            flags |= uapi.IoasMapFlags.FIXED_IOVA
        known = uapi.IoasMapFlags.FIXED_IOVA | uapi.IoasMapFlags.READABLE
        if int(flags) & ~int(known | uapi.IoasMapFlags.WRITEABLE):
            raise _err(errno.EOPNOTSUPP, op, f"flags {flags:#x}: unknown bits")
        ioas = self._ioas(ioas_id, op)
        length = mapping.length
        if length <= 0 or length % PAGE_SIZE or mapping.offset % PAGE_SIZE:
            raise _err(errno.EINVAL, op, f"length {length:#x}: expected a non-zero page multiple")
        if not flags & (uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE):
            raise _err(errno.EINVAL, op, "flags: expected READABLE and/or WRITEABLE")
        if iova is None:
            iova = PAGE_SIZE
            for m in sorted(ioas.maps, key=lambda m: m.iova):
                if iova + length <= m.iova:
                    break
                iova = max(iova, m.iova + m.length)
        if iova % PAGE_SIZE:
            raise _err(errno.EINVAL, op, f"iova {iova:#x}: expected {PAGE_SIZE:#x} alignment")
        if iova + length - 1 > uapi.U64_MAX:
            raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} + length {length:#x} overflows")
        for m in ioas.maps:
            if iova < m.iova + m.length and m.iova < iova + length:
                raise _err(
                    errno.EEXIST,
                    op,
                    f"[{iova:#x}, {iova + length:#x}) overlaps [{m.iova:#x}, "
                    f"{m.iova + m.length:#x}) of IOAS {ioas_id}",
                )
        ioas.maps.append(IoasMap(iova, length, mapping, flags))
        self.smmu.flush_stage2(ioas)
        return iova

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: whole mappings only; ENOENT if nothing was mapped."""
        op = "IOAS_UNMAP"
        ioas = self._ioas(ioas_id, op)
        if iova == 0 and length == uapi.U64_MAX:
            last = uapi.U64_MAX
        else:
            if length == 0 or iova % PAGE_SIZE or length % PAGE_SIZE:
                raise _err(errno.EINVAL, op, f"iova {iova:#x} length {length:#x}: not page aligned")
            last = iova + length - 1
        unmapped = 0
        keep: list[IoasMap] = []
        for m in ioas.maps:
            m_last = m.iova + m.length - 1
            if m.iova > last or m_last < iova:
                keep.append(m)
            elif m.iova >= iova and m_last <= last:
                unmapped += m.length
            else:
                # iopt_unmap_iova_range refuses to split an area.
                raise _err(
                    errno.ENOENT,
                    op,
                    f"[{iova:#x}, {last:#x}] would split mapping [{m.iova:#x}, {m_last:#x}]",
                )
        if not unmapped:
            raise _err(errno.ENOENT, op, f"nothing mapped in [{iova:#x}, {last:#x}]")
        ioas.maps = keep
        self.smmu.flush_stage2(ioas)
        return unmapped

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """``IOMMU_IOAS_IOVA_RANGES``: the whole 64-bit space, page alignment."""
        self._ioas(ioas_id, "IOAS_IOVA_RANGES")
        return [(0, uapi.U64_MAX)], PAGE_SIZE

    # --- HWPT ---

    def hwpt_alloc(
        self,
        dev_id: int,
        pt_id: int,
        flags: int = 0,
        data: Vste | None = None,
        data_type: int | None = None,
        data_len: int | None = None,
    ) -> int:
        """``IOMMU_HWPT_ALLOC`` (iommufd_hwpt_alloc)."""
        op = "HWPT_ALLOC"
        if data_type is None:
            data_type = uapi.HwptDataType.ARM_SMMUV3 if data is not None else 0
        if data_len is None:
            data_len = uapi.VSTE_SIZE if data is not None else 0
        if (data_type == uapi.HwptDataType.NONE and data_len) or (
            data_type != uapi.HwptDataType.NONE and not data_len
        ):
            raise _err(errno.EINVAL, op, f"data_type {data_type} with data_len {data_len}")
        dev = self._device(dev_id, op)
        pt = self._objects.get(pt_id)
        if pt is None:
            # iommufd_hwpt_alloc turns a missing pt_id into EINVAL, not ENOENT.
            raise _err(errno.EINVAL, op, f"pt_id {pt_id}: no such object")
        if isinstance(pt, SimIoas):
            return self._hwpt_paging_alloc(dev, pt, flags, data_type, op)
        if isinstance(pt, SimHwptPaging):
            # ARM has no ops->domain_alloc_nested: nesting goes through a vIOMMU.
            raise _err(errno.EOPNOTSUPP, op, f"pt_id {pt_id}: HWPT_PAGING parent, expected vIOMMU")
        if isinstance(pt, SimViommu):
            vste = list(data) if data is not None else []
            return self._hwpt_nested_alloc(pt, flags, data_type, data_len, vste, op)
        raise _err(errno.EINVAL, op, f"pt_id {pt_id}: a {pt.type.value}, expected IOAS or vIOMMU")

    def _hwpt_paging_alloc(
        self, dev: SimDevice, ioas: SimIoas, flags: int, data_type: int, op: str
    ) -> int:
        valid = uapi.HwptAllocFlags.NEST_PARENT | uapi.HwptAllocFlags.DIRTY_TRACKING
        valid |= uapi.HwptAllocFlags.PASID
        if int(flags) & ~int(valid) or data_type != uapi.HwptDataType.NONE:
            raise _err(errno.EOPNOTSUPP, op, f"paging flags {flags:#x} data_type {data_type}")
        if flags & uapi.HwptAllocFlags.DIRTY_TRACKING:
            raise _err(errno.EOPNOTSUPP, op, "DIRTY_TRACKING: the host SMMU has no HTTU")
        nest_parent = bool(flags & uapi.HwptAllocFlags.NEST_PARENT)
        if nest_parent and not self.personality.nesting:
            raise _err(errno.EOPNOTSUPP, op, "NEST_PARENT: the host SMMU has no nesting")
        hwpt = SimHwptPaging(self._alloc_id(), ioas=ioas, nest_parent=nest_parent)
        hwpt.vmid = self._next_vmid
        self._next_vmid += 1
        ioas.users += 1
        self._add(hwpt)
        return hwpt.id

    def _hwpt_nested_alloc(
        self,
        viommu: SimViommu,
        flags: int,
        data_type: int,
        data_len: int,
        vste: list[int],
        op: str,
    ) -> int:
        if int(flags) & ~int(uapi.HwptAllocFlags.FAULT_ID_VALID | uapi.HwptAllocFlags.PASID):
            raise _err(errno.EOPNOTSUPP, op, f"nested flags {flags:#x}")
        if flags & uapi.HwptAllocFlags.FAULT_ID_VALID:
            raise _err(errno.ENOENT, op, "fault_id: the sim has no FAULT objects")
        if flags:
            # arm_vsmmu_alloc_domain_nested refuses every remaining flag.
            raise _err(errno.EOPNOTSUPP, op, f"nested flags {flags:#x}: expected 0")
        if data_type != uapi.HwptDataType.ARM_SMMUV3:
            raise _err(errno.EINVAL, op, f"data_type {data_type}: expected ARM_SMMUV3")
        if data_len < uapi.VSTE_SIZE:
            raise _err(errno.EINVAL, op, f"data_len {data_len}: expected >= {uapi.VSTE_SIZE}")
        words = [*vste, 0, 0][:2]
        if any(vste[2:]):
            raise _err(errno.E2BIG, op, f"data_len {data_len}: non-zero bytes past the vSTE")
        stored, enable_ats = validate_vste(words, self.personality.ats_in_nested, op)
        hwpt = SimHwptNested(self._alloc_id(), viommu=viommu, ste=stored, enable_ats=enable_ats)
        viommu.users += 1
        self._add(hwpt)
        return hwpt.id

    # --- attach ---

    def _pt_for_attach(self, dev: SimDevice, pt_id: int, op: str) -> SimHwptPaging | SimHwptNested:
        pt = self._get(
            pt_id, (ObjType.IOAS, ObjType.HWPT_PAGING, ObjType.HWPT_NESTED), op, "pt_id"
        )
        if isinstance(pt, SimIoas):
            for obj in self._objects.values():
                if isinstance(obj, SimHwptPaging) and obj.auto and obj.ioas is pt:
                    return obj
            auto = SimHwptPaging(self._alloc_id(), ioas=pt, auto=True, vmid=self._next_vmid)
            self._next_vmid += 1
            pt.users += 1
            self._add(auto)
            return auto
        if isinstance(pt, SimHwptNested):
            assert pt.viommu is not None
            cfg = STE.CONFIG.get(pt.ste[0]) if STE.V.test(pt.ste[0]) else SteConfig.ABORT
            # arm_smmu_attach_prepare_vmaster: translate needs a vDEVICE first.
            has_vdev = dev.vdev is not None and dev.vdev.viommu is pt.viommu
            if cfg == SteConfig.S1_TRANS and not has_vdev:
                raise _err(
                    errno.ENOENT,
                    op,
                    f"dev {dev.id}: no vDEVICE on vIOMMU {pt.viommu.id} for a translate vSTE",
                )
        assert isinstance(pt, SimHwptPaging | SimHwptNested)
        return pt

    def _release_hwpt(self, hwpt: SimHwptPaging | SimHwptNested) -> None:
        hwpt.users -= 1
        if isinstance(hwpt, SimHwptPaging) and hwpt.auto and hwpt.users == 0:
            self._destroy_obj(hwpt)

    def device_attach(self, dev_id: int, pt_id: int) -> None:
        """Attach ``dev_id`` (replace if attached, as the VFIO cdev ioctl does)."""
        op = "ATTACH_IOMMUFD_PT"
        dev = self._device(dev_id, op)
        new = self._pt_for_attach(dev, pt_id, op)
        old = dev.hwpt
        if old is new:
            return
        new.users += 1
        dev.hwpt = new
        if old is not None:
            self._release_hwpt(old)
        self.smmu.install_ste(dev)

    def device_replace(self, dev_id: int, pt_id: int) -> None:
        """Replace the HWPT of an attached device (EINVAL if it is not attached)."""
        dev = self._device(dev_id, "REPLACE")
        if dev.hwpt is None:
            raise _err(errno.EINVAL, "REPLACE", f"dev {dev_id}: not attached")
        self.device_attach(dev_id, pt_id)

    def device_detach(self, dev_id: int) -> None:
        """Detach ``dev_id``: its DMA is blocked afterwards."""
        op = "DETACH_IOMMUFD_PT"
        dev = self._device(dev_id, op)
        if dev.hwpt is None:
            raise _err(errno.EINVAL, op, f"dev {dev_id}: not attached")
        old = dev.hwpt
        dev.hwpt = None
        self._release_hwpt(old)
        self.smmu.install_ste(dev)

    # --- vIOMMU, vDEVICE ---

    def viommu_alloc(
        self, dev_id: int, hwpt_id: int, type_: int = uapi.ViommuType.ARM_SMMUV3, flags: int = 0
    ) -> int:
        """``IOMMU_VIOMMU_ALLOC`` (iommufd_viommu_alloc_ioctl + arm_vsmmu_init)."""
        op = "VIOMMU_ALLOC"
        if flags or type_ == uapi.ViommuType.DEFAULT:
            raise _err(errno.EOPNOTSUPP, op, f"flags {flags:#x} type {type_}")
        self._device(dev_id, op)
        p = self.personality
        if type_ != uapi.ViommuType.ARM_SMMUV3 or not p.nesting or not (p.canwbs or p.s2fwb):
            raise _err(
                errno.EOPNOTSUPP,
                op,
                f"type {type_}: host nesting={p.nesting} canwbs={p.canwbs} s2fwb={p.s2fwb}",
            )
        parent = self._get(hwpt_id, (ObjType.HWPT_PAGING,), op, "hwpt_id")
        assert isinstance(parent, SimHwptPaging)
        if not parent.nest_parent:
            raise _err(errno.EINVAL, op, f"hwpt {hwpt_id}: not allocated with NEST_PARENT")
        viommu = SimViommu(self._alloc_id(), parent=parent)
        parent.users += 1
        self._add(viommu)
        return viommu.id

    def _viommu(self, viommu_id: int, op: str) -> SimViommu:
        obj = self._get(viommu_id, (ObjType.VIOMMU,), op, "viommu_id")
        assert isinstance(obj, SimViommu)
        return obj

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """``IOMMU_VDEVICE_ALLOC``: EEXIST for a second vDEVICE or a taken virt_id."""
        op = "VDEVICE_ALLOC"
        if virt_id > uapi.ULONG_MAX:
            raise _err(errno.EINVAL, op, f"virt_id {virt_id:#x} exceeds ULONG_MAX")
        viommu = self._viommu(viommu_id, op)
        dev = self._device(dev_id, op)
        if dev.vdev is not None:
            raise _err(errno.EEXIST, op, f"dev {dev_id}: already vDEVICE {dev.vdev.id}")
        if virt_id in viommu.vdevs:
            raise _err(errno.EEXIST, op, f"virt_id {virt_id:#x}: taken on vIOMMU {viommu_id}")
        vdev = SimVdevice(self._alloc_id(), viommu=viommu, device=dev, virt_id=virt_id)
        viommu.users += 1
        viommu.vdevs[virt_id] = vdev
        dev.vdev = vdev
        self._add(vdev)
        return vdev.id

    # --- invalidation ---

    def hwpt_invalidate(
        self,
        id_: int,
        entries: Sequence[InvalidationCommand],
        data_type: int = uapi.HwptInvalidateDataType.ARM_SMMUV3,
        entry_len: int = uapi.ARM_INVALIDATE_ENTRY_SIZE,
    ) -> int:
        """``IOMMU_HWPT_INVALIDATE`` (iommufd_hwpt_invalidate + arm_vsmmu_cache_invalidate).

        Each entry is laid out as the user array would hold it (``entry_len``
        bytes, truncated or zero-padded) and handed to the shared core.  With
        the native ``entry_len`` that layout is the words themselves, so they go
        to the core as they are (no pack/unpack per entry).
        """
        u64_max = uapi.U64_MAX
        if entry_len == uapi.ARM_INVALIDATE_ENTRY_SIZE and all(
            0 <= w0 <= u64_max and 0 <= w1 <= u64_max for w0, w1 in entries
        ):
            viommu = self._invalidate_target(id_, len(entries), data_type, entry_len)
            return self.smmu.invalidate_batch(viommu, entries, "HWPT_INVALIDATE")
        array = b"".join(
            struct.pack("<QQ", w0, w1)[:entry_len].ljust(entry_len, b"\0") for w0, w1 in entries
        )
        return self._invalidate(id_, array, len(entries), data_type, entry_len)

    def _invalidate_target(
        self, id_: int, entry_num: int, data_type: int, entry_len: int
    ) -> SimViommu:
        """The header checks of iommufd_hwpt_invalidate, in the kernel's order."""
        op = "HWPT_INVALIDATE"
        if entry_num and entry_len == 0:
            raise _err(errno.EINVAL, op, "entry_len 0 with a non-empty array")
        obj = self._objects.get(id_)
        if obj is None:
            raise _err(errno.ENOENT, op, f"hwpt_id {id_}: no such object")
        if isinstance(obj, SimHwptNested):
            raise _err(errno.EOPNOTSUPP, op, f"hwpt {id_}: ARM nested HWPTs invalidate via vIOMMU")
        if not isinstance(obj, SimViommu):
            raise _err(errno.EINVAL, op, f"hwpt_id {id_}: a {obj.type.value}, expected vIOMMU")
        if data_type != uapi.HwptInvalidateDataType.ARM_SMMUV3:
            raise _err(errno.EINVAL, op, f"data_type {data_type}: expected ARM_SMMUV3")
        if not entry_num:
            raise _err(errno.EINVAL, op, "entry_num 0")
        return obj

    def _invalidate(
        self, id_: int, array: bytes, entry_num: int, data_type: int, entry_len: int
    ) -> int:
        """The invalidation core behind the typed method and the raw ioctl."""
        op = "HWPT_INVALIDATE"
        viommu = self._invalidate_target(id_, entry_num, data_type, entry_len)
        # The whole array is copied (copy_struct_from_user per entry) before any is converted:
        # a short entry is zero-extended, a long one must have a zero tail (E2BIG, 0 handled).
        size = uapi.ARM_INVALIDATE_ENTRY_SIZE
        packed: list[tuple[int, int]] = []
        for index in range(entry_num):
            raw = array[index * entry_len : (index + 1) * entry_len]
            if any(raw[size:]):
                raise _err(errno.E2BIG, op, f"entry {index}: non-zero bytes past {size}")
            w0, w1 = struct.unpack("<QQ", raw[:size].ljust(size, b"\0"))
            packed.append((w0, w1))
        return self.smmu.invalidate_batch(viommu, packed, op)

    # --- vEVENTQ ---

    def veventq_alloc(
        self,
        viommu_id: int,
        depth: int,
        type_: int = uapi.VeventqType.ARM_SMMUV3,
        flags: int = 0,
    ) -> VeventqHandle:
        """``IOMMU_VEVENTQ_ALLOC``: one queue per type per vIOMMU (EEXIST)."""
        op = "VEVENTQ_ALLOC"
        if flags or type_ == uapi.VeventqType.DEFAULT:
            raise _err(errno.EOPNOTSUPP, op, f"flags {flags:#x} type {type_}")
        if not depth:
            raise _err(errno.EINVAL, op, "veventq_depth 0")
        viommu = self._viommu(viommu_id, op)
        if viommu.veventq is not None:
            raise _err(errno.EEXIST, op, f"vIOMMU {viommu_id}: already vEVENTQ {viommu.veventq.id}")
        q = SimVeventq(self._alloc_id(), viommu=viommu, queue=SimVeventQueue(depth))
        viommu.users += 1
        viommu.veventq = q
        self._add(q)
        assert q.queue is not None
        return VeventqHandle(q.id, q.queue.reader_fd)

    def report_event(self, viommu: SimViommu, event: bytes) -> bool:
        """Deliver one event record to the vIOMMU's vEVENTQ; False if it has none."""
        q = viommu.veventq
        if q is None or q.queue is None:
            return False
        q.queue.report(event)
        return True

    # --- DMA of emulated endpoints (the sim plays the physical SMMU) ---

    def dma_read(self, dev_id: int, iova: int, length: int) -> bytes:
        """Read ``length`` bytes at ``iova`` as device ``dev_id``; raises DmaFault."""
        # Fast path: an IOTLB hit within one 4K page (no allocation beyond the result).
        pages = self.smmu.fast.get(dev_id)
        if pages is not None:
            offset = iova & TLB_PAGE_MASK
            hit = pages.get(iova >> TLB_PAGE_SHIFT)
            if hit is not None and offset + length <= TLB_PAGE_SIZE and length >= 0:
                return hit[0][offset : offset + length].tobytes()
        dev = self._device(dev_id, "DMA")
        return b"".join(bytes(v) for v in self.smmu.access(dev, iova, length, False))

    def dma_write(self, dev_id: int, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` as device ``dev_id``; raises DmaFault (nothing written)."""
        pages = self.smmu.fast.get(dev_id)
        if pages is not None:
            offset = iova & TLB_PAGE_MASK
            hit = pages.get(iova >> TLB_PAGE_SHIFT)
            if hit is not None and hit[1] and offset + len(data) <= TLB_PAGE_SIZE:
                hit[0][offset : offset + len(data)] = data
                return
        dev = self._device(dev_id, "DMA")
        pos = 0
        for view in self.smmu.access(dev, iova, len(data), True):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    def dma_views(self, dev_id: int, iova: int, length: int, write: bool) -> list[memoryview]:
        """Translate ``[iova, iova + length)`` as device ``dev_id``: the host views, in order.

        Every page is translated (and permission-checked) before this returns,
        so a DmaFault leaves guest memory untouched.
        """
        dev = self._device(dev_id, "DMA")
        return self.smmu.access(dev, iova, length, write)

    # --- the raw ioctl entry point (iommufd_fops_ioctl) ---

    def ioctl(self, request: int, buf: bytearray) -> None:
        """Execute one /dev/iommu ioctl on ``buf``, the user's structure, mutated in place.

        Dispatch follows ``iommufd_fops_ioctl``: an unknown or unmodelled
        request is ENOTTY; the structure's leading ``size`` below the ioctl's
        min_size is EINVAL; a larger structure with a non-zero tail is E2BIG; a
        shorter one is zero-extended.  The decoded structure then goes through
        the same methods the typed API uses, and the outputs are copied back
        (``size`` bytes at most).  Pointers in the structure (``user_va``,
        ``data_uptr``...) are addresses in this process, as for the kernel; a
        NULL one is EFAULT, anything else is trusted.
        """
        handler = _IOCTL_HANDLERS.get(request)
        entry = uapi.IOCTL_STRUCTS.get(uapi.Ioctl(request)) if handler else None
        if handler is None or entry is None:
            raise _err(
                errno.ENOTTY, "IOCTL", f"request {request:#x}: not an iommufd ioctl the sim models"
            )
        cls, min_size = entry
        op = handler.__name__.removeprefix("_ioctl_").upper()
        size_field = ctypes.sizeof(ctypes.c_uint32)
        if len(buf) < size_field:
            raise _err(errno.EFAULT, op, f"buffer of {len(buf)} bytes holds no size field")
        user_size = int.from_bytes(buf[:size_field], "little")
        if user_size < min_size:
            raise _err(errno.EINVAL, op, f"size {user_size}: expected >= {min_size}")
        if len(buf) < user_size:
            raise _err(errno.EFAULT, op, f"size {user_size} beyond the {len(buf)}-byte buffer")
        kernel_size = ctypes.sizeof(cls)
        if any(buf[kernel_size:user_size]):
            raise _err(errno.E2BIG, op, f"size {user_size}: non-zero bytes past {kernel_size}")
        given = bytes(buf[: min(user_size, kernel_size)])
        cmd = cls.from_buffer_copy(given.ljust(kernel_size, b"\0"))
        for name, *_ in cls._fields_:
            if name.startswith("reserved") and _nonzero(getattr(cmd, name)):
                raise _err(errno.EOPNOTSUPP, op, f"{cls.C_NAME}.{name}: expected 0")
        respond = min(user_size, kernel_size)
        try:
            handler(self, cmd)
        except IommufdError:
            # These two copy their outputs back even when failing (entry_num, num_iovas).
            if request in _RESPOND_ON_ERROR:
                buf[:respond] = cmd.to_bytes()[:respond]
            raise
        buf[:respond] = cmd.to_bytes()[:respond]

    # --- destroy ---

    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY``: ENOENT for an unknown id, EBUSY while in use."""
        op = "DESTROY"
        obj = self._objects.get(obj_id)
        if obj is None:
            raise _err(errno.ENOENT, op, f"id {obj_id}: no such object")
        if isinstance(obj, SimDevice):
            raise _err(errno.EBUSY, op, f"dev {obj_id}: devices are unbound, not destroyed")
        if obj.users:
            raise _err(errno.EBUSY, op, f"{obj.type.value} {obj_id}: {obj.users} user(s)")
        self._destroy_obj(obj)

    def _destroy_obj(self, obj: SimObject) -> None:
        if isinstance(obj, SimHwptPaging) and obj.ioas is not None:
            obj.ioas.users -= 1
            self.smmu.flush_vmid(obj.vmid)
        elif isinstance(obj, SimHwptNested) and obj.viommu is not None:
            obj.viommu.users -= 1
        elif isinstance(obj, SimViommu) and obj.parent is not None:
            obj.parent.users -= 1
        elif isinstance(obj, SimVdevice) and obj.viommu is not None:
            obj.viommu.users -= 1
            obj.viommu.vdevs.pop(obj.virt_id, None)
            if obj.device is not None:
                obj.device.vdev = None
        elif isinstance(obj, SimVeventq) and obj.viommu is not None:
            obj.viommu.users -= 1
            obj.viommu.veventq = None
            if obj.queue is not None:
                obj.queue.close()
        del self._objects[obj.id]
        log.info("iommufd sim: destroyed %s %d", obj.type.value, obj.id)

    def close(self) -> None:
        """Close every vEVENTQ's sim end."""
        for obj in list(self._objects.values()):
            if isinstance(obj, SimVeventq) and obj.queue is not None:
                obj.queue.close()


# --- raw ioctl handlers: decode the structure, call the typed core, fill outputs ---

_PYBUF_WRITE = 0x200
"""CPython's PyBUF_WRITE: a writable memoryview over process memory."""
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def _nonzero(value: object) -> bool:
    if isinstance(value, int):
        return value != 0
    return any(bytes(value))  # type: ignore[call-overload]


def _user_memory(address: int, length: int, op: str, what: str) -> memoryview:
    """A writable view of ``length`` bytes of this process at ``address`` (EFAULT if NULL)."""
    if not address:
        raise _err(errno.EFAULT, op, f"{what}: NULL with length {length}")
    if length > sys.maxsize:
        raise _err(errno.EOVERFLOW, op, f"{what}: length {length:#x} too large")
    view: memoryview = _memory_view(address, length, _PYBUF_WRITE)
    return view


def _ioctl_destroy(sim: SimIommufd, cmd: Any) -> None:
    sim.destroy(cmd.id)


def _ioctl_ioas_alloc(sim: SimIommufd, cmd: Any) -> None:
    if cmd.flags:
        raise _err(errno.EOPNOTSUPP, "IOAS_ALLOC", f"flags {cmd.flags:#x}: expected 0")
    cmd.out_ioas_id = sim.ioas_alloc()


def _ioctl_ioas_map(sim: SimIommufd, cmd: Any) -> None:
    flags = uapi.IoasMapFlags(cmd.flags)
    fixed = bool(flags & uapi.IoasMapFlags.FIXED_IOVA)
    memory = _user_memory(cmd.user_va, cmd.length, "IOAS_MAP", "user_va")
    cmd.iova = sim.ioas_map(cmd.ioas_id, HostMapping(memory), cmd.iova if fixed else None, flags)


def _ioctl_ioas_unmap(sim: SimIommufd, cmd: Any) -> None:
    cmd.length = sim.ioas_unmap(cmd.ioas_id, cmd.iova, cmd.length)


def _ioctl_ioas_iova_ranges(sim: SimIommufd, cmd: Any) -> None:
    ranges, alignment = sim.ioas_iova_ranges(cmd.ioas_id)
    room = cmd.num_iovas
    cmd.num_iovas = len(ranges)
    cmd.out_iova_alignment = alignment
    if room < len(ranges):
        raise _err(errno.EMSGSIZE, "IOAS_IOVA_RANGES", f"num_iovas {room}: {len(ranges)} needed")
    entry = ctypes.sizeof(uapi.IommuIovaRange)
    out = _user_memory(cmd.allowed_iovas, len(ranges) * entry, "IOAS_IOVA_RANGES",
                       "allowed_iovas")
    for index, (start, last) in enumerate(ranges):
        out[index * entry : (index + 1) * entry] = uapi.IommuIovaRange(start, last).to_bytes()


def _ioctl_hwpt_alloc(sim: SimIommufd, cmd: Any) -> None:
    data: list[int] | None = None
    if cmd.data_len:
        raw = bytes(_user_memory(cmd.data_uptr, cmd.data_len, "HWPT_ALLOC", "data_uptr"))
        raw = raw.ljust(-(-len(raw) // 8) * 8, b"\0")
        data = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
    cmd.out_hwpt_id = sim.hwpt_alloc(
        cmd.dev_id, cmd.pt_id, cmd.flags, data, data_type=cmd.data_type, data_len=cmd.data_len
    )


def _ioctl_get_hw_info(sim: SimIommufd, cmd: Any) -> None:
    op = "GET_HW_INFO"
    if cmd.flags & ~uapi.HwInfoFlags.INPUT_TYPE:
        raise _err(errno.EOPNOTSUPP, op, f"flags {cmd.flags:#x}: expected INPUT_TYPE or 0")
    data_type = cmd.out_data_type if cmd.flags & uapi.HwInfoFlags.INPUT_TYPE else 0
    info = sim.hw_info(cmd.dev_id, data_type)
    if cmd.data_len:
        out = _user_memory(cmd.data_uptr, cmd.data_len, op, "data_uptr")
        copied = min(cmd.data_len, len(info.data))
        # The kernel zeroes what the user offered beyond its own structure.
        out[:] = info.data[:copied].ljust(cmd.data_len, b"\0")
        cmd.data_len = copied
    cmd.out_data_type = info.data_type
    cmd.out_capabilities = info.capabilities
    cmd.out_max_pasid_log2 = info.max_pasid_log2


def _ioctl_hwpt_invalidate(sim: SimIommufd, cmd: Any) -> None:
    op = "HWPT_INVALIDATE"
    requested = cmd.entry_num
    cmd.entry_num = 0
    if requested and (not cmd.data_uptr or not cmd.entry_len):
        raise _err(errno.EINVAL, op, f"entry_num {requested} without data_uptr or entry_len")
    array = bytes(_user_memory(cmd.data_uptr, requested * cmd.entry_len, op, "data_uptr")) \
        if requested else b""
    try:
        cmd.entry_num = sim._invalidate(cmd.hwpt_id, array, requested, cmd.data_type,
                                        cmd.entry_len)
    except IommufdError as exc:
        cmd.entry_num = exc.handled
        raise


def _ioctl_viommu_alloc(sim: SimIommufd, cmd: Any) -> None:
    cmd.out_viommu_id = sim.viommu_alloc(cmd.dev_id, cmd.hwpt_id, cmd.type, cmd.flags)


def _ioctl_vdevice_alloc(sim: SimIommufd, cmd: Any) -> None:
    cmd.out_vdevice_id = sim.vdevice_alloc(cmd.viommu_id, cmd.dev_id, cmd.virt_id)


def _ioctl_veventq_alloc(sim: SimIommufd, cmd: Any) -> None:
    handle = sim.veventq_alloc(cmd.viommu_id, cmd.veventq_depth, cmd.type, cmd.flags)
    cmd.out_veventq_id = handle.id
    cmd.out_veventq_fd = handle.fd


_IOCTL_HANDLERS: dict[int, Callable[[SimIommufd, Any], None]] = {
    uapi.Ioctl.IOMMU_DESTROY: _ioctl_destroy,
    uapi.Ioctl.IOMMU_IOAS_ALLOC: _ioctl_ioas_alloc,
    uapi.Ioctl.IOMMU_IOAS_MAP: _ioctl_ioas_map,
    uapi.Ioctl.IOMMU_IOAS_UNMAP: _ioctl_ioas_unmap,
    uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES: _ioctl_ioas_iova_ranges,
    uapi.Ioctl.IOMMU_HWPT_ALLOC: _ioctl_hwpt_alloc,
    uapi.Ioctl.IOMMU_GET_HW_INFO: _ioctl_get_hw_info,
    uapi.Ioctl.IOMMU_HWPT_INVALIDATE: _ioctl_hwpt_invalidate,
    uapi.Ioctl.IOMMU_VIOMMU_ALLOC: _ioctl_viommu_alloc,
    uapi.Ioctl.IOMMU_VDEVICE_ALLOC: _ioctl_vdevice_alloc,
    uapi.Ioctl.IOMMU_VEVENTQ_ALLOC: _ioctl_veventq_alloc,
}
"""Every /dev/iommu ioctl the sim models (each one a thin decoder over the typed method)."""

_RESPOND_ON_ERROR = frozenset({uapi.Ioctl.IOMMU_HWPT_INVALIDATE, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES})
