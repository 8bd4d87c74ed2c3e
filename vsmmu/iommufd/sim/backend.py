"""The simulated iommufd backend: a model of the host kernel's iommufd.

Objects (:mod:`.objects`) follow ``drivers/iommu/iommufd`` and
``arm-smmu-v3-iommufd.c``:

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
:meth:`SimIommufd.dma_write`, translated by the physical SMMU
(:mod:`.physical_smmu`, see its docstring for the stage-1/stage-2 walk, the
IOTLB and the fault policy).  Raw ``/dev/iommu`` ioctls are decoded by
:mod:`.ioctl` into the same typed methods.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Sequence
from typing import TypeVar

from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import (
    HostMapping,
    HwInfo,
    InvalidationCommand,
    IommufdError,
    ObjectInfo,
    VeventqHandle,
    Vste,
    check_invalidation_words,
    issued_before_refusal,
)
from vsmmu.iommufd.sim.host import HostPersonality, check_no_fault_id, validate_vste
from vsmmu.iommufd.sim.invalidate import (
    UserCommandCheck,
    copy_entries,
    invalidation_target,
    lay_out_entries,
)
from vsmmu.iommufd.sim.ioas import (
    ACCESS,
    allowed_ranges,
    check_device_reservations,
    check_domain_addable,
    check_map_header,
    domain_aperture_last,
    iova_alignment,
    map_into,
    reserved_iova,
    unmap_from,
)
from vsmmu.iommufd.sim.ioctl import IoctlTarget, decode_ioctl
from vsmmu.iommufd.sim.iotlb import TLB_PAGE_MASK, TLB_PAGE_SHIFT, TLB_PAGE_SIZE
from vsmmu.iommufd.sim.objects import (
    SimDevice,
    SimHwptNested,
    SimHwptPaging,
    SimIoas,
    SimObject,
    SimVdevice,
    SimVeventq,
    SimViommu,
)
from vsmmu.iommufd.sim.objects import sim_error as _err
from vsmmu.iommufd.sim.physical_smmu import PhysicalSmmu
from vsmmu.iommufd.veventq import SimVeventQueue

log = logging.getLogger(__name__)

_O = TypeVar("_O", bound=SimObject)

VEVENTQ_MAX_DEPTH = 1 << 19
"""``VEVENTQ_MAX_DEPTH`` of drivers/iommu/iommufd/eventq.c: an arbitrary kernel bound."""


class SimIommufd(IoctlTarget):
    """The simulated iommufd (see the module docstring)."""

    name = "sim"

    def __init__(self, personality: HostPersonality | None = None) -> None:
        self._personality = personality or HostPersonality()
        self._command_check = UserCommandCheck(self._personality)
        self._objects: dict[int, SimObject] = {}
        self._next_vmid = 1
        self._tombstones: set[int] = set()  # ids never handed out again (main.c:278)
        self.smmu = PhysicalSmmu(self.report_event)
        """The physical SMMU's translation machinery (IOTLB, config cache, walker)."""

    @property
    def personality(self) -> HostPersonality:
        """What the simulated host supports (fixed: the invalidation check is built from it)."""
        return self._personality

    # --- object table ---

    def _alloc_id(self) -> int:
        i = 1
        while i in self._objects or i in self._tombstones:
            i += 1
        return i

    def _take_vmid(self) -> int:
        vmid = self._next_vmid
        self._next_vmid += 1
        return vmid

    def _add(self, obj: _O) -> _O:
        self._objects[obj.id] = obj
        log.info("iommufd sim: allocated %s %d", obj.type.value, obj.id)
        return obj

    def _get(self, obj_id: int, kinds: tuple[type[_O], ...], op: str, what: str) -> _O:
        obj = self._objects.get(obj_id)
        if not isinstance(obj, kinds):
            raise self._wrong_kind(obj_id, obj, kinds, op, what)
        return obj

    @staticmethod
    def _wrong_kind(obj_id: int, obj: SimObject | None, kinds: tuple[type[SimObject], ...],
                    op: str, what: str) -> IommufdError:
        expected = "/".join(k.type.value for k in kinds)
        found = obj.type.value if obj else "nothing"
        return _err(errno.ENOENT, op, f"{what} {obj_id}: expected a {expected}, found {found}")

    def _device(self, dev_id: int, op: str) -> SimDevice:
        return self._get(dev_id, (SimDevice,), op, "dev_id")

    def objects(self) -> list[ObjectInfo]:
        """The object table, ordered by id."""
        return [
            ObjectInfo(o.id, o.type, o.users, o.detail())
            for o in sorted(self._objects.values(), key=lambda o: o.id)
        ]

    def object(self, obj_id: int) -> SimObject | None:
        """The sim object with this id, or None."""
        return self._objects.get(obj_id)

    # --- devices ---

    def create_mock_device(self, stream_id: int, name: str = "") -> int:
        """Bind a mock device with physical StreamID ``stream_id``; return its dev_id."""
        return self._add(SimDevice(self._alloc_id(), stream_id=stream_id, name=name)).id

    def destroy_mock_device(self, dev_id: int) -> None:
        """Unbind a mock device (detaching it and destroying its vDEVICE first)."""
        dev = self._device(dev_id, "UNBIND")
        if dev.hwpt is not None:
            self.device_detach(dev_id)
        if dev.vdev is not None:  # iommufd_device_remove_vdev: destroyed, id tombstoned
            self._tombstones.add(dev.vdev.id)
            self._destroy_obj(dev.vdev)
        del self._objects[dev_id]

    def hw_info(self, dev_id: int, data_type: int = uapi.HwInfoType.DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO``: the personality's ARM SMMUv3 ID registers."""
        op = "GET_HW_INFO"
        self._device(dev_id, op)
        # arm_smmu_hw_info: any type but DEFAULT/ARM_SMMUV3 needs impl ops we lack.
        if data_type not in (uapi.HwInfoType.DEFAULT, uapi.HwInfoType.ARM_SMMUV3):
            raise _err(errno.EOPNOTSUPP, op, f"data_type {data_type}: expected ARM_SMMUV3")
        return self.personality.hw_info()

    # --- IOAS ---

    def ioas_alloc(self) -> int:
        """``IOMMU_IOAS_ALLOC``."""
        return self._add(SimIoas(self._alloc_id())).id

    def _ioas(self, ioas_id: int, op: str) -> SimIoas:
        return self._get(ioas_id, (SimIoas,), op, "ioas_id")

    def ioas_map(self, ioas_id: int, mapping: HostMapping, iova: int | None = None,
                 flags: uapi.IoasMapFlags = ACCESS) -> int:
        """``IOMMU_IOAS_MAP`` (see :mod:`.ioas` for the checks and their order)."""
        if iova is not None:
            flags |= uapi.IoasMapFlags.FIXED_IOVA
        check_map_header(int(flags), iova or 0, mapping.length)
        ioas = self._ioas(ioas_id, "IOAS_MAP")
        reserved = reserved_iova(ioas, self._objects.values(), self.personality)
        iova = map_into(ioas, self._domains(ioas), reserved, mapping, iova, flags)
        self.smmu.flush_stage2(ioas)
        return iova

    def _domains(self, ioas: SimIoas) -> int:
        """Paging domains on ``ioas`` (each paging HWPT adds one, ``iopt_table_add_domain``)."""
        return sum(1 for o in self._objects.values()
                   if isinstance(o, SimHwptPaging) and o.ioas is ioas)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: whole mappings only, in IOVA order (see :mod:`.ioas`)."""
        ioas = self._ioas(ioas_id, "IOAS_UNMAP")
        try:
            return unmap_from(ioas, iova, length)
        finally:
            # Even a failing unmap may have removed the mappings before the one it refused.
            self.smmu.flush_stage2(ioas)

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """``IOMMU_IOAS_IOVA_RANGES``: what no reservation takes; alignment 1 until a domain."""
        ioas = self._ioas(ioas_id, "IOAS_IOVA_RANGES")
        reserved = reserved_iova(ioas, self._objects.values(), self.personality)
        return allowed_ranges(reserved), iova_alignment(self._domains(ioas))

    # --- HWPT ---

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data: Vste | None = None,
                   data_type: int | None = None, data_len: int | None = None) -> int:
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
        nest_parent = self.personality.check_paging_alloc(flags, data_type, op)
        last = domain_aperture_last(self.personality, nest_parent)
        check_domain_addable(ioas, self._domains(ioas), last)
        check_no_fault_id(flags, op)
        hwpt = SimHwptPaging(self._alloc_id(), ioas=ioas, vmid=self._take_vmid(),
                             nest_parent=nest_parent, aperture_last=last)
        ioas.users += 1
        return self._add(hwpt).id

    def _hwpt_nested_alloc(self, viommu: SimViommu, flags: int, data_type: int, data_len: int,
                           vste: list[int], op: str) -> int:
        if int(flags) & ~int(uapi.HwptAllocFlags.FAULT_ID_VALID | uapi.HwptAllocFlags.PASID):
            raise _err(errno.EOPNOTSUPP, op, f"nested flags {flags:#x}")
        if not data_len:
            raise _err(errno.EOPNOTSUPP, op, "no vSTE data")  # hw_pagetable.c:307
        if flags & ~uapi.HwptAllocFlags.FAULT_ID_VALID:
            # arm_vsmmu_alloc_domain_nested refuses every flag it is given.
            raise _err(errno.EOPNOTSUPP, op, f"nested flags {flags:#x}: expected 0")
        if data_type != uapi.HwptDataType.ARM_SMMUV3:
            raise _err(errno.EINVAL, op, f"data_type {data_type}: expected ARM_SMMUV3")
        if data_len != uapi.VSTE_SIZE:
            # __iommu_copy_struct_from_user: shorter than the first version, or longer than
            # the kernel's struct (zero tail or not), is EINVAL.
            raise _err(errno.EINVAL, op, f"data_len {data_len}: expected {uapi.VSTE_SIZE}")
        words = [*vste, 0, 0][:2]
        stored, enable_ats = validate_vste(words, self.personality.ats_in_nested, op)
        check_no_fault_id(flags, op)
        hwpt = SimHwptNested(self._alloc_id(), viommu=viommu, ste=stored, enable_ats=enable_ats)
        viommu.users += 1
        return self._add(hwpt).id

    # --- attach ---

    def _pt_for_attach(self, dev: SimDevice, pt_id: int, op: str) -> SimHwptPaging | SimHwptNested:
        pt = self._objects.get(pt_id)
        if isinstance(pt, SimHwptPaging):
            return pt
        if isinstance(pt, SimIoas):
            for obj in self._objects.values():
                if isinstance(obj, SimHwptPaging) and obj.auto and obj.ioas is pt:
                    return obj
            last = domain_aperture_last(self.personality, False)
            check_domain_addable(pt, self._domains(pt), last, op)
            auto = SimHwptPaging(self._alloc_id(), ioas=pt, vmid=self._take_vmid(), auto=True,
                                 aperture_last=last)
            pt.users += 1
            return self._add(auto)
        if isinstance(pt, SimHwptNested):
            cfg = STE.CONFIG.get(pt.ste[0]) if STE.V.test(pt.ste[0]) else SteConfig.ABORT
            # arm_smmu_attach_prepare_vmaster: translate needs a vDEVICE first.
            has_vdev = dev.vdev is not None and dev.vdev.viommu is pt.viommu
            if cfg == SteConfig.S1_TRANS and not has_vdev:
                raise _err(
                    errno.ENOENT,
                    op,
                    f"dev {dev.id}: no vDEVICE on vIOMMU {pt.viommu.id} for a translate vSTE",
                )
            return pt
        if pt is None:
            raise _err(errno.ENOENT, op, f"pt_id {pt_id}: no such object")
        # iommufd_device_change_pt looks up any type, then refuses the wrong one.
        raise _err(errno.EINVAL, op, f"pt_id {pt_id}: a {pt.type.value}, expected IOAS or HWPT")

    def _release_hwpt(self, hwpt: SimHwptPaging | SimHwptNested) -> None:
        hwpt.users -= 1
        if isinstance(hwpt, SimHwptPaging) and hwpt.auto and hwpt.users == 0:
            self._destroy_obj(hwpt)

    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """Attach ``dev_id`` (replace if attached, as the VFIO cdev ioctl does)."""
        op = "ATTACH_IOMMUFD_PT"
        dev = self._device(dev_id, op)
        new = self._pt_for_attach(dev, pt_id, op)
        old = dev.hwpt
        if old is new:
            return new.id
        try:
            check_device_reservations(old, new, self.personality, op)
        except IommufdError:
            if isinstance(new, SimHwptPaging) and new.auto and not new.users:
                self._destroy_obj(new)  # the automatic domain made for this attach goes again
            raise
        new.users += 1
        dev.hwpt = new
        if old is not None:
            self._release_hwpt(old)
        self.smmu.install_ste(dev)
        return new.id

    def device_replace(self, dev_id: int, pt_id: int) -> None:
        """Replace the HWPT of an attached device (EINVAL if it is not attached)."""
        dev = self._device(dev_id, "REPLACE")
        if dev.hwpt is None:
            raise _err(errno.EINVAL, "REPLACE", f"dev {dev_id}: not attached")
        self.device_attach(dev_id, pt_id)

    def device_detach(self, dev_id: int) -> None:
        """Detach ``dev_id``: its DMA is blocked afterwards; detaching nothing is a no-op.

        (vfio_iommufd_physical_detach_ioas returns quietly when nothing is attached.)
        """
        op = "DETACH_IOMMUFD_PT"
        dev = self._device(dev_id, op)
        if dev.hwpt is None:
            return
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
        parent = self._get(hwpt_id, (SimHwptPaging,), op, "hwpt_id")
        if not parent.nest_parent:
            raise _err(errno.EINVAL, op, f"hwpt {hwpt_id}: not allocated with NEST_PARENT")
        parent.users += 1
        return self._add(SimViommu(self._alloc_id(), parent=parent)).id

    def _viommu(self, viommu_id: int, op: str) -> SimViommu:
        return self._get(viommu_id, (SimViommu,), op, "viommu_id")

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
        return self._add(vdev).id

    # --- invalidation ---

    def hwpt_invalidate(
        self,
        id_: int,
        entries: Sequence[InvalidationCommand],
        data_type: int = uapi.HwptInvalidateDataType.ARM_SMMUV3,
        entry_len: int = uapi.ARM_INVALIDATE_ENTRY_SIZE,
    ) -> int:
        """``IOMMU_HWPT_INVALIDATE`` (iommufd_hwpt_invalidate + arm_vsmmu_cache_invalidate).

        With the native ``entry_len`` the user array's layout is the words
        themselves, so they go to the physical SMMU as they are; any other
        ``entry_len`` lays them out as the user array would hold them
        (truncated or zero-padded) for the raw ioctl's core.
        """
        op = "HWPT_INVALIDATE"
        if entry_len != uapi.ARM_INVALIDATE_ENTRY_SIZE:
            check_invalidation_words(entries, op)
            array = lay_out_entries(entries, entry_len)
            return self.invalidate_array(id_, array, len(entries), data_type, entry_len)
        viommu = invalidation_target(self._objects.get(id_), id_, len(entries), data_type,
                                     entry_len)
        refused = self._command_check.first_refused(entries, viommu.vdevs)
        if refused is not None:
            # Every word of an entry the check takes is within its opcode's allowed
            # bits, so unsigned 64-bit: only a batch with a refused entry can hold a
            # word no user array could (EINVAL, before any entry).
            check_invalidation_words(entries, op)
        return self._invalidate_up_to(viommu, entries, refused, op)

    def invalidate_array(
        self, id_: int, array: bytes, entry_num: int, data_type: int, entry_len: int
    ) -> int:
        """The invalidation core of the typed method and the raw ioctl (``entry_len`` each)."""
        op = "HWPT_INVALIDATE"
        viommu = invalidation_target(self._objects.get(id_), id_, entry_num, data_type, entry_len)
        entries = copy_entries(array, entry_num, entry_len)
        return self._invalidate_up_to(
            viommu, entries, self._command_check.first_refused(entries, viommu.vdevs), op)

    def _invalidate_up_to(self, viommu: SimViommu, entries: Sequence[InvalidationCommand],
                          refused: int | None, op: str) -> int:
        """Run ``entries`` if the host takes them all; else EIO with ``handled`` = the refused
        one's index, having run only the whole blocks before it, as the kernel does
        (:func:`issued_before_refusal`)."""
        if refused is None:
            return self.smmu.invalidate_batch(viommu, entries, op)
        self.smmu.invalidate_batch(viommu, entries[:issued_before_refusal(refused)], op)
        w0, w1 = entries[refused]
        raise self._command_check.refusal(w0, w1, op, handled=refused)

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
        if not depth or depth > VEVENTQ_MAX_DEPTH:
            raise _err(errno.EINVAL, op, f"veventq_depth {depth}: expected 1..{VEVENTQ_MAX_DEPTH}")
        viommu = self._viommu(viommu_id, op)
        if type_ in viommu.veventqs:
            raise _err(errno.EEXIST, op, f"vIOMMU {viommu_id}: already a type {type_} vEVENTQ")
        q = self._add(SimVeventq(self._alloc_id(), viommu=viommu, queue=SimVeventQueue(depth),
                                 queue_type=type_))
        viommu.users += 1
        viommu.veventqs[type_] = q
        return VeventqHandle(q.id, q.queue.reader_fd)

    def veventq_read(self, fd: int, count: int) -> bytes:
        """The kernel's read of a vEVENTQ fd (:meth:`SimVeventQueue.read`)."""
        queue = next((o.queue for o in self._objects.values()
                      if isinstance(o, SimVeventq) and o.queue.reader_fd == fd), None)
        if queue is None:
            raise _err(errno.EBADF, "VEVENTQ_READ", f"fd {fd}: no vEVENTQ of this sim")
        try:
            return queue.read(count)
        except OSError as exc:
            raise _err(exc.errno or errno.EIO, "VEVENTQ_READ", exc.strerror or str(exc)) from None

    def report_event(self, viommu: SimViommu, event: bytes) -> bool:
        """Deliver one event record to the vIOMMU's vEVENTQ; False if it has none."""
        q = viommu.veventqs.get(uapi.VeventqType.ARM_SMMUV3)
        if q is None:
            return False
        q.queue.report(event)
        return True

    # --- DMA of emulated endpoints (the sim plays the physical SMMU) ---

    def device_dma(self, dev_id: int) -> SimDeviceDma:
        """Device ``dev_id``'s DMA through the simulated physical SMMU (:meth:`dma_read`...)."""
        return SimDeviceDma(self, dev_id)

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

    def ioctl(self, request: int, buf: bytearray) -> None:
        """Execute one /dev/iommu ioctl on ``buf`` (see :func:`.ioctl.decode_ioctl`)."""
        decode_ioctl(self, request, buf)

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
        if isinstance(obj, SimVeventq) and obj.queue.reader_open():
            raise _err(errno.EBUSY, op, f"vEVENTQ {obj_id}: its fd is still open")
        self._destroy_obj(obj)

    def _destroy_obj(self, obj: SimObject) -> None:
        if isinstance(obj, SimHwptPaging):
            obj.ioas.users -= 1
            self.smmu.flush_vmid(obj.vmid)
        elif isinstance(obj, SimHwptNested):
            obj.viommu.users -= 1
        elif isinstance(obj, SimViommu):
            obj.parent.users -= 1
        elif isinstance(obj, SimVdevice):
            obj.viommu.users -= 1
            obj.viommu.vdevs.pop(obj.virt_id, None)
            obj.device.vdev = None
        elif isinstance(obj, SimVeventq):
            obj.viommu.users -= 1
            obj.viommu.veventqs.pop(obj.queue_type, None)
            obj.queue.close()
        del self._objects[obj.id]
        log.info("iommufd sim: destroyed %s %d", obj.type.value, obj.id)

    def close(self) -> None:
        """Close every vEVENTQ's sim end."""
        for obj in list(self._objects.values()):
            if isinstance(obj, SimVeventq):
                obj.queue.close()


class SimDeviceDma:
    """The :class:`~vsmmu.iommufd.backend.DeviceDma` of one mock device: its accesses are
    :meth:`SimIommufd.dma_read`, :meth:`~SimIommufd.dma_write` and
    :meth:`~SimIommufd.dma_views` with the device bound in (no extra call per access)."""

    def __init__(self, sim: SimIommufd, dev_id: int) -> None:
        self.dev_id = dev_id
        self.read = functools.partial(sim.dma_read, dev_id)
        self.write = functools.partial(sim.dma_write, dev_id)
        self.views = functools.partial(sim.dma_views, dev_id)
