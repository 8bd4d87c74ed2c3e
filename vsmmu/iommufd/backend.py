"""The iommufd backend interface the nesting translator codes against.

Two implementations exist: :class:`vsmmu.iommufd.sim.SimIommufd` (the
embedded default: a model of the host kernel *and* the physical SMMU, which
also translates DMA of emulated endpoints) and
:class:`vsmmu.iommufd.kernel.KernelIommufd` (real ioctls on ``/dev/iommu``).

Every operation is one iommufd ioctl and raises :class:`IommufdError` with the
errno the kernel would return.  Object ids are plain ``int``s, as in the uAPI.

Typical translator flow (DESIGN.md §3)::

    ioas = be.ioas_alloc()
    be.ioas_map(ioas, HostMapping(guest_ram_mmap), iova=ram_base)
    s2 = be.hwpt_alloc(dev, ioas, flags=HwptAllocFlags.NEST_PARENT)
    viommu = be.viommu_alloc(dev, s2)
    be.vdevice_alloc(viommu, dev, virt_id=guest_sid)
    q = be.veventq_alloc(viommu, depth=64)      # poll q.fd; be.veventq_read(q.fd, 4096)
    nested = be.hwpt_alloc(dev, viommu, data=vste_words)
    be.device_attach(dev, nested)
    handled = be.hwpt_invalidate(viommu, [(cmd0, cmd1), ...])
"""

from __future__ import annotations

import abc
import ctypes
import enum
import errno
import logging
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vsmmu.arch.events import Event
from vsmmu.iommufd import uapi

log = logging.getLogger(__name__)


class IommufdError(OSError):
    """An iommufd operation failed.

    ``errno`` is the kernel's errno, ``op`` the ioctl (e.g. ``"HWPT_ALLOC"``),
    ``handled`` the number of invalidation entries handled before the failing
    one (only meaningful for ``HWPT_INVALIDATE``).
    """

    def __init__(self, err: int, op: str, message: str, *, handled: int = 0) -> None:
        super().__init__(err, f"{op}: {errno.errorcode.get(err, str(err))}: {message}")
        self.op = op
        self.handled = handled


class DmaFault(Exception):
    """A device's DMA that the host SMMU refused.

    ``event`` is the architectural event the host recorded (None when the
    transaction was silently aborted or the device is blocked); ``delivered``
    tells whether it went to a vEVENTQ (with the vSID) rather than to the
    host's own log.
    """

    def __init__(self, message: str, event: Event | None = None, delivered: bool = False) -> None:
        super().__init__(message)
        self.event = event
        self.delivered = delivered


class DeviceDma(Protocol):
    """A backend's DMA capability for one device: its accesses, translated by the host SMMU.

    Each call raises :class:`DmaFault` when the host refuses the access (nothing
    is written then) and :class:`IommufdError` when the device is gone.
    """

    def read(self, iova: int, length: int) -> bytes:
        """``length`` bytes at ``iova``."""
        ...

    def write(self, iova: int, data: bytes) -> None:
        """Store ``data`` at ``iova``."""
        ...

    def views(self, iova: int, length: int, write: bool) -> list[memoryview]:
        """Host views of the whole translated range, every page checked first (zero copy)."""
        ...


class ObjType(enum.Enum):
    """Kinds of iommufd objects (``enum iommufd_object_type`` in the kernel)."""

    DEVICE = "device"
    IOAS = "ioas"
    HWPT_PAGING = "hwpt_paging"
    HWPT_NESTED = "hwpt_nested"
    VIOMMU = "viommu"
    VDEVICE = "vdevice"
    VEVENTQ = "veventq"


@dataclass
class HostMapping:
    """Host memory the caller owns, to be mapped into an IOAS.

    ``buffer`` is a writable buffer (an :class:`mmap.mmap` of guest RAM, a
    ``bytearray``, a writable ``memoryview``); ``offset``/``length`` select a
    window of it (``length`` defaults to the rest).  The kernel backend passes
    :attr:`user_va`; the sim reads and writes :meth:`view`.  The buffer must outlive the mapping.
    """

    buffer: mmap.mmap | bytearray | memoryview
    offset: int = 0
    length: int = -1
    _view: memoryview | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.length < 0:
            self.length = len(self.buffer) - self.offset

    @property
    def user_va(self) -> int:
        """The process virtual address of the window's first byte."""
        # The temporary ctypes object is dropped at once, so the buffer keeps no export.
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer, self.offset))

    def view(self) -> memoryview:
        """A writable memoryview of the window (cached)."""
        if self._view is None:
            self._view = memoryview(self.buffer)[self.offset : self.offset + self.length]
        return self._view

    def release(self) -> None:
        """Drop the cached view so the owner can close an mmap."""
        if self._view is not None:
            self._view.release()
            self._view = None


@dataclass(frozen=True)
class HwInfo:
    """Result of ``IOMMU_GET_HW_INFO``."""

    data_type: uapi.HwInfoType
    data: bytes
    capabilities: uapi.HwCapabilities
    max_pasid_log2: int

    def arm_smmuv3(self) -> uapi.IommuHwInfoArmSmmuv3:
        """Decode :attr:`data` as the ARM SMMUv3 info (IDR0-5, IIDR, AIDR)."""
        info = uapi.IommuHwInfoArmSmmuv3()
        size = min(len(self.data), ctypes.sizeof(info))
        ctypes.memmove(ctypes.addressof(info), self.data, size)
        return info


@dataclass(frozen=True)
class VeventqHandle:
    """An allocated vEVENTQ: its object id and its pollable fd.

    The caller owns ``fd`` and closes it (as with the kernel); the object
    cannot be destroyed while it is open (EBUSY).  Poll ``fd`` for readiness
    and read records with :meth:`IommufdBackend.veventq_read`.
    """

    id: int
    fd: int


@dataclass(frozen=True)
class ObjectInfo:
    """One row of the object table (QMP ``query-vsmmu-iommufd``)."""

    id: int
    type: ObjType
    users: int
    detail: dict[str, int | str | None]


Vste = Sequence[int]
"""The two 64-bit words of an ARM vSTE (``struct iommu_hwpt_arm_smmuv3``)."""

InvalidationCommand = tuple[int, int]
"""One raw 16-byte SMMUv3 command as two 64-bit words."""


def issued_before_refusal(refused: int) -> int:
    """How many entries of a batch the kernel ran when it refused entry ``refused``: the
    whole blocks of :data:`uapi.ARM_INVALIDATE_ISSUE_BLOCK` before it
    (arm_vsmmu_cache_invalidate drops the block it was filling)."""
    return refused - refused % uapi.ARM_INVALIDATE_ISSUE_BLOCK


def check_invalidation_words(entries: Sequence[InvalidationCommand], op: str) -> None:
    """EINVAL (nothing handled) unless every word of ``entries`` is a 64-bit unsigned value."""
    u64_max = uapi.U64_MAX
    for index, (w0, w1) in enumerate(entries):
        if not (0 <= w0 <= u64_max and 0 <= w1 <= u64_max):
            raise IommufdError(errno.EINVAL, op,
                               f"entry {index} ({w0:#x}, {w1:#x}): words must be unsigned 64-bit")


class IommufdBackend(abc.ABC):
    """What the translator needs from iommufd; see the module docstring.

    All methods raise :class:`IommufdError` with the kernel's errno.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def hw_info(self, dev_id: int, data_type: int = uapi.HwInfoType.DEFAULT) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` for ``dev_id``."""

    @abc.abstractmethod
    def ioas_alloc(self) -> int:
        """``IOMMU_IOAS_ALLOC``: return the new IOAS id."""

    @abc.abstractmethod
    def ioas_map(
        self,
        ioas_id: int,
        mapping: HostMapping,
        iova: int | None = None,
        flags: uapi.IoasMapFlags = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE,
    ) -> int:
        """``IOMMU_IOAS_MAP``: map ``mapping`` at ``iova`` (FIXED_IOVA) or anywhere.

        Returns the IOVA used.
        """

    @abc.abstractmethod
    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``: return the number of bytes unmapped."""

    @abc.abstractmethod
    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """``IOMMU_IOAS_IOVA_RANGES``: ``([(start, last), ...], iova_alignment)``."""

    @abc.abstractmethod
    def hwpt_alloc(
        self,
        dev_id: int,
        pt_id: int,
        flags: int = 0,
        data: Vste | None = None,
        data_type: int | None = None,
        data_len: int | None = None,
    ) -> int:
        """``IOMMU_HWPT_ALLOC``.

        Paging (``pt_id`` an IOAS, ``data`` None, e.g. ``flags=NEST_PARENT``) or
        nested (``pt_id`` a vIOMMU, ``data`` the vSTE; ``data_type`` defaults to
        ARM_SMMUV3 when ``data`` is given).  ``data_len`` overrides the length
        (for tests of the size rules).
        """

    @abc.abstractmethod
    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """Attach (or, if already attached, replace) the device's page table; return the
        HWPT attached, as VFIO writes back ``pt_id`` (for an IOAS, its automatic domain)."""

    @abc.abstractmethod
    def device_replace(self, dev_id: int, pt_id: int) -> None:
        """Replace the HWPT of an attached device (EINVAL if not attached)."""

    @abc.abstractmethod
    def device_detach(self, dev_id: int) -> None:
        """Detach the device from its page table."""

    @abc.abstractmethod
    def viommu_alloc(
        self, dev_id: int, hwpt_id: int, type_: int = uapi.ViommuType.ARM_SMMUV3, flags: int = 0
    ) -> int:
        """``IOMMU_VIOMMU_ALLOC`` on the nest-parent ``hwpt_id``."""

    @abc.abstractmethod
    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """``IOMMU_VDEVICE_ALLOC``: bind ``dev_id`` to virtual StreamID ``virt_id``."""

    @abc.abstractmethod
    def hwpt_invalidate(
        self,
        id_: int,
        entries: Sequence[InvalidationCommand],
        data_type: int = uapi.HwptInvalidateDataType.ARM_SMMUV3,
        entry_len: int = uapi.ARM_INVALIDATE_ENTRY_SIZE,
    ) -> int:
        """``IOMMU_HWPT_INVALIDATE`` on a vIOMMU (or nested HWPT).

        Returns the number of entries handled (all of them).  On failure the
        raised :class:`IommufdError` carries ``handled`` = index of the failing
        entry and that entry's errno.
        """

    @abc.abstractmethod
    def veventq_alloc(
        self,
        viommu_id: int,
        depth: int,
        type_: int = uapi.VeventqType.ARM_SMMUV3,
        flags: int = 0,
    ) -> VeventqHandle:
        """``IOMMU_VEVENTQ_ALLOC``: a queue of ``depth`` events and its fd."""

    @abc.abstractmethod
    def veventq_read(self, fd: int, count: int) -> bytes:
        """``read(fd, count)`` of a vEVENTQ fd, with the kernel's rules
        (``iommufd_veventq_fops_read``): as many whole ``[header][event]`` records
        as fit in ``count``, 0 bytes when the queue is empty (it never blocks);
        EINVAL if ``count`` is less than a header, or if the first event does
        not fit.  Raises :class:`IommufdError` (op ``VEVENTQ_READ``)."""

    @abc.abstractmethod
    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY`` (EBUSY while the object is in use)."""

    @abc.abstractmethod
    def objects(self) -> list[ObjectInfo]:
        """The object table, ordered by id."""

    def device_dma(self, dev_id: int) -> DeviceDma | None:
        """The DMA path of device ``dev_id`` through this backend's host SMMU.

        None when the backend cannot issue DMA for its devices: real devices
        (the kernel backend) do their own, in hardware.  The sim models the
        physical SMMU and returns one for its mock devices.
        """
        del dev_id
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's own resources."""
