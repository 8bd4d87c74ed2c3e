"""Host-side fault injection: an :class:`IommufdBackend` whose next calls fail on demand.

:class:`FaultInjectingBackend` wraps any backend (the sim or the kernel) and
forwards every call, except that :meth:`~FaultInjectingBackend.arm` makes
the next ``count`` calls of one operation raise :class:`IommufdError` with a
chosen errno, as the kernel would have.  ``hwpt_invalidate`` can fail at
entry ``k`` of a batch: the whole blocks of
:data:`~vsmmu.iommufd.uapi.ARM_INVALIDATE_ISSUE_BLOCK` entries before it are
handed to the wrapped backend (they take effect; the kernel drops the block it
was filling when an entry is refused) and the error carries ``handled = k``;
a batch of ``k`` entries or fewer passes untouched and does not use up the
armed failure.  Nothing is allocated for a failed call, so
nothing can leak from it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import errno as errno_module
import logging
from collections.abc import Sequence

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import (
    DeviceDma,
    HostMapping,
    HwInfo,
    InvalidationCommand,
    IommufdBackend,
    IommufdError,
    ObjectInfo,
    VeventqHandle,
    Vste,
    issued_before_refusal,
)

logger = logging.getLogger(__name__)


class BackendOp(enum.Enum):
    """The backend operations a failure can be armed for (the method names)."""

    HW_INFO = "hw_info"
    IOAS_ALLOC = "ioas_alloc"
    IOAS_MAP = "ioas_map"
    IOAS_UNMAP = "ioas_unmap"
    HWPT_ALLOC = "hwpt_alloc"
    DEVICE_ATTACH = "device_attach"
    DEVICE_REPLACE = "device_replace"
    DEVICE_DETACH = "device_detach"
    VIOMMU_ALLOC = "viommu_alloc"
    VDEVICE_ALLOC = "vdevice_alloc"
    HWPT_INVALIDATE = "hwpt_invalidate"
    VEVENTQ_ALLOC = "veventq_alloc"
    DESTROY = "destroy"


@dataclasses.dataclass
class ArmedFailure:
    """The next ``count`` calls fail with ``errno`` (``entry``: hwpt_invalidate's index)."""

    errno: int
    count: int
    entry: int = 0

    def describe(self) -> dict[str, object]:
        """For QMP: errno by name, count, entry."""
        return {"errno": errno_module.errorcode.get(self.errno, str(self.errno)),
                "count": self.count, "entry": self.entry}


class FaultInjectingBackend(IommufdBackend):
    """Forwards to ``inner``; armed operations fail (module docstring)."""

    def __init__(self, inner: IommufdBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self._armed: dict[BackendOp, ArmedFailure] = {}
        self.injected: collections.Counter[BackendOp] = collections.Counter()
        """Failures injected so far, by operation."""

    def arm(self, op: BackendOp, err: int, count: int = 1, entry: int = 0) -> None:
        """Make the next ``count`` calls of ``op`` fail with ``err`` (0 calls: disarm).

        Raises ValueError for a negative count or entry, or an entry with an
        operation other than hwpt_invalidate.
        """
        if count < 0 or entry < 0:
            raise ValueError(f"count {count} / entry {entry}: expected non-negative numbers")
        if entry and op is not BackendOp.HWPT_INVALIDATE:
            raise ValueError(f"entry {entry}: only hwpt_invalidate fails at an entry")
        if count == 0:
            self._armed.pop(op, None)
            return
        self._armed[op] = ArmedFailure(err, count, entry)
        logger.warning("fault injection: next %d %s call(s) fail with %s%s", count, op.value,
                       errno_module.errorcode.get(err, err),
                       f" at entry {entry}" if op is BackendOp.HWPT_INVALIDATE else "")

    def armed(self) -> dict[str, dict[str, object]]:
        """What is armed, by operation name."""
        return {op.value: failure.describe() for op, failure in self._armed.items()}

    def _take(self, op: BackendOp) -> ArmedFailure | None:
        failure = self._armed.get(op)
        if failure is None:
            return None
        failure.count -= 1
        if failure.count <= 0:
            del self._armed[op]
        self.injected[op] += 1
        return failure

    def _check(self, op: BackendOp) -> None:
        failure = self._take(op)
        if failure is not None:
            logger.warning("fault injection: %s fails with %s", op.value,
                           errno_module.errorcode.get(failure.errno, failure.errno))
            raise IommufdError(failure.errno, op.name, "injected by x-vsmmu-fail")

    # --- the interface, forwarded ---

    def hw_info(self, dev_id: int, data_type: int = uapi.HwInfoType.DEFAULT) -> HwInfo:
        """Forwarded (armable)."""
        self._check(BackendOp.HW_INFO)
        return self.inner.hw_info(dev_id, data_type)

    def ioas_alloc(self) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.IOAS_ALLOC)
        return self.inner.ioas_alloc()

    def ioas_map(self, ioas_id: int, mapping: HostMapping, iova: int | None = None,
                 flags: uapi.IoasMapFlags = uapi.IoasMapFlags.READABLE
                 | uapi.IoasMapFlags.WRITEABLE) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.IOAS_MAP)
        return self.inner.ioas_map(ioas_id, mapping, iova, flags)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.IOAS_UNMAP)
        return self.inner.ioas_unmap(ioas_id, iova, length)

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """Forwarded."""
        return self.inner.ioas_iova_ranges(ioas_id)

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data: Vste | None = None,
                   data_type: int | None = None, data_len: int | None = None) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.HWPT_ALLOC)
        return self.inner.hwpt_alloc(dev_id, pt_id, flags, data, data_type, data_len)

    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.DEVICE_ATTACH)
        return self.inner.device_attach(dev_id, pt_id)

    def device_replace(self, dev_id: int, pt_id: int) -> None:
        """Forwarded (armable)."""
        self._check(BackendOp.DEVICE_REPLACE)
        self.inner.device_replace(dev_id, pt_id)

    def device_detach(self, dev_id: int) -> None:
        """Forwarded (armable)."""
        self._check(BackendOp.DEVICE_DETACH)
        self.inner.device_detach(dev_id)

    def viommu_alloc(self, dev_id: int, hwpt_id: int, type_: int = uapi.ViommuType.ARM_SMMUV3,
                     flags: int = 0) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.VIOMMU_ALLOC)
        return self.inner.viommu_alloc(dev_id, hwpt_id, type_, flags)

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        """Forwarded (armable)."""
        self._check(BackendOp.VDEVICE_ALLOC)
        return self.inner.vdevice_alloc(viommu_id, dev_id, virt_id)

    def hwpt_invalidate(self, id_: int, entries: Sequence[InvalidationCommand],
                        data_type: int = uapi.HwptInvalidateDataType.ARM_SMMUV3,
                        entry_len: int = uapi.ARM_INVALIDATE_ENTRY_SIZE) -> int:
        """Forwarded; an armed failure hits the batch's entry ``k`` (module docstring)."""
        failure = self._armed.get(BackendOp.HWPT_INVALIDATE)
        if failure is None or len(entries) <= failure.entry:
            return self.inner.hwpt_invalidate(id_, entries, data_type, entry_len)
        self._take(BackendOp.HWPT_INVALIDATE)
        k = failure.entry
        issued = issued_before_refusal(k)
        if issued:
            self.inner.hwpt_invalidate(id_, entries[:issued], data_type, entry_len)
        logger.warning("fault injection: hwpt_invalidate fails at entry %d of %d with %s", k,
                       len(entries), errno_module.errorcode.get(failure.errno, failure.errno))
        raise IommufdError(failure.errno, BackendOp.HWPT_INVALIDATE.name,
                           f"entry {k}: injected by x-vsmmu-fail", handled=k)

    def veventq_alloc(self, viommu_id: int, depth: int,
                      type_: int = uapi.VeventqType.ARM_SMMUV3, flags: int = 0) -> VeventqHandle:
        """Forwarded (armable)."""
        self._check(BackendOp.VEVENTQ_ALLOC)
        return self.inner.veventq_alloc(viommu_id, depth, type_, flags)

    def veventq_read(self, fd: int, count: int) -> bytes:
        """Forwarded."""
        return self.inner.veventq_read(fd, count)

    def destroy(self, obj_id: int) -> None:
        """Forwarded (armable)."""
        self._check(BackendOp.DESTROY)
        self.inner.destroy(obj_id)

    def objects(self) -> list[ObjectInfo]:
        """Forwarded."""
        return self.inner.objects()

    def device_dma(self, dev_id: int) -> DeviceDma | None:
        """Forwarded: the wrapped backend's DMA capability (DMA is not armable)."""
        return self.inner.device_dma(dev_id)

    def close(self) -> None:
        """Forwarded."""
        self.inner.close()
