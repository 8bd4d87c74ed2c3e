"""``IOMMU_HWPT_INVALIDATE`` before the physical SMMU sees it: the kernel's header
checks (``iommufd_hwpt_invalidate``) and its copy of the user's entry array."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import InvalidationCommand
from vsmmu.iommufd.sim.objects import SimHwptNested, SimObject, SimViommu
from vsmmu.iommufd.sim.objects import sim_error as _err

_OP = "HWPT_INVALIDATE"
_ENTRY = uapi.ARM_INVALIDATE_ENTRY_SIZE
_WORD = _ENTRY // 2


def invalidation_target(obj: SimObject | None, id_: int, entry_num: int, data_type: int,
                        entry_len: int) -> SimViommu:
    """The vIOMMU ``id_`` names (``obj``), after the header checks in the kernel's order."""
    if entry_num and entry_len == 0:
        raise _err(errno.EINVAL, _OP, "entry_len 0 with a non-empty array")
    if obj is None:
        raise _err(errno.ENOENT, _OP, f"hwpt_id {id_}: no such object")
    if isinstance(obj, SimHwptNested):
        raise _err(errno.EOPNOTSUPP, _OP, f"hwpt {id_}: ARM nested HWPTs invalidate via vIOMMU")
    if not isinstance(obj, SimViommu):
        raise _err(errno.EINVAL, _OP, f"hwpt_id {id_}: a {obj.type.value}, expected vIOMMU")
    if data_type != uapi.HwptInvalidateDataType.ARM_SMMUV3:
        raise _err(errno.EINVAL, _OP, f"data_type {data_type}: expected ARM_SMMUV3")
    if not entry_num:
        raise _err(errno.EINVAL, _OP, "entry_num 0")
    return obj


def copy_entries(array: bytes, entry_num: int, entry_len: int) -> list[InvalidationCommand]:
    """The entries of the user array, each as ``copy_struct_from_user`` copies it.

    The whole array is copied before any entry is converted: a short entry
    is zero-extended, a long one must have a zero tail (else E2BIG, 0 handled).
    """
    entries: list[InvalidationCommand] = []
    for index in range(entry_num):
        raw = array[index * entry_len : (index + 1) * entry_len]
        if any(raw[_ENTRY:]):
            raise _err(errno.E2BIG, _OP, f"entry {index}: non-zero bytes past {_ENTRY}")
        raw = raw[:_ENTRY].ljust(_ENTRY, b"\0")
        entries.append((int.from_bytes(raw[:_WORD], "little"),
                        int.from_bytes(raw[_WORD:], "little")))
    return entries


def lay_out_entries(entries: Sequence[InvalidationCommand], entry_len: int) -> bytes:
    """``entries`` as a user array of ``entry_len``-byte entries (truncated or zero-padded)."""
    return b"".join(
        (w0.to_bytes(_WORD, "little") + w1.to_bytes(_WORD, "little"))[:entry_len]
        .ljust(entry_len, b"\0")
        for w0, w1 in entries
    )
