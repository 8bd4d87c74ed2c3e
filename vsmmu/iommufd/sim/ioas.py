"""IOAS map and unmap as the kernel's io_pagetable does them (``ioas.c``, ``io_pagetable.c``).

The rules that matter to a user, each checked in the kernel's order:

* an IOAS without a domain has IOVA alignment 1 (``iopt_init_table``); once a
  paging HWPT adds a domain it is PAGE_SIZE (``iopt_table_add_domain``), and
  adding one is refused with EADDRINUSE while an unaligned mapping exists;
* MAP: unknown flags EOPNOTSUPP, iova or length >= ULONG_MAX EOVERFLOW, no
  access bit EINVAL, then the IOAS lookup, then length 0 EINVAL, then the
  alignment of length and IOVA (EINVAL), wrap EOVERFLOW and
  overlap EEXIST;
* UNMAP: the IOAS lookup first; unmap-all of nothing is success; otherwise
  EOVERFLOW at ULONG_MAX, EINVAL for length 0, EOVERFLOW for a wrapping
  range, then areas are removed in IOVA order until one sticks out of the
  range (ENOENT, the earlier ones stay unmapped); nothing unmapped is ENOENT.
  No alignment is required.

* reserved IOVA (``iopt_reserve_iova``): a domain reserves what lies beyond
  its aperture, a device attached to a HWPT of the IOAS (nested ones count
  for their parent's) reserves its MSI window; MAP into reserved IOVA is
  EINVAL, IOVA_RANGES reports what is left, the automatic IOVA avoids it, and
  adding a domain or attaching a device over an existing mapping is EADDRINUSE.

* the automatic IOVA (``iopt_alloc_iova``) keeps the user address's page
  offset and is aligned to the smaller of the length's power of two and the
  address's own alignment (at most PAGE_SIZE: the lane's kernel has no THP),
  never below the IOAS's; and once a domain exists the user address's page
  offset must meet the IOAS's alignment (``iopt_insert_area``), so a mapping
  starting mid-page is EINVAL there.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim.host import HostPersonality
from vsmmu.iommufd.sim.objects import (
    IoasMap,
    SimDevice,
    SimHwptNested,
    SimHwptPaging,
    SimIoas,
    SimObject,
)
from vsmmu.iommufd.sim.objects import sim_error as _err

PAGE_SIZE = 4096
"""The host's PAGE_SIZE: the IOVA alignment of an IOAS with a domain."""
MAX_ALLOC_ALIGNMENT = PAGE_SIZE
"""iopt_alloc_iova aligns to at most HPAGE_SIZE with THP, else PAGE_SIZE (the lane's
kernel is built without CONFIG_TRANSPARENT_HUGEPAGE)."""
UNALIGNED = 1
"""The IOVA alignment of an IOAS with no domain (``iopt_init_table``)."""
ACCESS = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE
KNOWN_FLAGS = uapi.IoasMapFlags.FIXED_IOVA | ACCESS


def iova_alignment(domains: int) -> int:
    """The IOVA alignment of an IOAS holding ``domains`` paging domains."""
    return PAGE_SIZE if domains else UNALIGNED


def check_domain_addable(ioas: SimIoas, domains: int, aperture_last: int,
                         op: str = "HWPT_ALLOC") -> None:
    """``iopt_table_add_domain``: EADDRINUSE for an area off the page grid
    (``iopt_check_iova_alignment``) or beyond the new domain's aperture."""
    align = iova_alignment(domains + 1)
    if align != iova_alignment(domains):
        for m in ioas.maps:
            if (m.iova | m.length | m.page_offset) % align:
                raise _err(errno.EADDRINUSE, op,
                           f"IOAS {ioas.id} maps [{m.iova:#x}, +{m.length:#x}) from page offset "
                           f"{m.page_offset:#x}: off the page grid")
    check_reservable(ioas, aperture_last + 1, uapi.ULONG_MAX, op, "beyond the aperture")


def domain_aperture_last(host: HostPersonality, nest_parent: bool) -> int:
    """The aperture end of a new paging domain: stage 2 for a nest parent, else stage 1."""
    return (1 << (host.s2_input_bits if nest_parent else host.s1_input_bits)) - 1


def paging_of(hwpt: SimHwptPaging | SimHwptNested) -> SimHwptPaging:
    """The paging HWPT whose IOAS a device attached to ``hwpt`` reserves in
    (``find_hwpt_paging``: a nested HWPT's parent)."""
    return hwpt if isinstance(hwpt, SimHwptPaging) else hwpt.viommu.parent


def reserved_iova(ioas: SimIoas, objects: Iterable[SimObject],
                  host: HostPersonality) -> list[tuple[int, int]]:
    """``[start, last]`` of every reservation in ``ioas``: beyond each domain's aperture,
    and each attached device's MSI window."""
    reserved: list[tuple[int, int]] = []
    base, size = host.msi_window
    for obj in objects:
        if isinstance(obj, SimHwptPaging) and obj.ioas is ioas:
            if obj.aperture_last < uapi.ULONG_MAX:
                reserved.append((obj.aperture_last + 1, uapi.ULONG_MAX))
        elif (isinstance(obj, SimDevice) and obj.hwpt is not None
              and paging_of(obj.hwpt).ioas is ioas):
            reserved.append((base, base + size - 1))
    return reserved


def check_device_reservations(old: SimHwptPaging | SimHwptNested | None,
                              new: SimHwptPaging | SimHwptNested, host: HostPersonality,
                              op: str) -> None:
    """A device moving to ``new`` reserves its MSI window in that IOAS unless it is
    already there (``iopt_table_enforce_dev_resv_regions``): EADDRINUSE over a mapping."""
    ioas = paging_of(new).ioas
    if old is None or paging_of(old).ioas is not ioas:
        base, size = host.msi_window
        check_reservable(ioas, base, base + size - 1, op, "in the MSI window")


def check_reservable(ioas: SimIoas, start: int, last: int, op: str, what: str) -> None:
    """``iopt_reserve_iova``: EADDRINUSE when a mapping lies in ``[start, last]``."""
    m = _mapping_in(ioas, start, last)
    if m is not None:
        raise _err(errno.EADDRINUSE, op, f"IOAS {ioas.id} maps [{m.iova:#x}, "
                                         f"+{m.length:#x}) {what} [{start:#x}, {last:#x}]")


def _mapping_in(ioas: SimIoas, start: int, last: int) -> IoasMap | None:
    """A mapping of ``ioas`` meeting ``[start, last]`` (``iopt_area_iter_first``), or None."""
    for m in ioas.maps:
        if m.iova <= last and start <= m.iova + m.length - 1:
            return m
    return None


def allowed_ranges(reserved: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The IOVA ranges of ``[0, ULONG_MAX]`` no reserved range touches, in order."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for low, high in sorted(reserved):
        if low > start:
            ranges.append((start, low - 1))
        start = max(start, high + 1)
        if start > uapi.ULONG_MAX:
            return ranges
    ranges.append((start, uapi.ULONG_MAX))
    return ranges


def check_map_header(flags: int, iova: int, length: int) -> None:
    """The checks ``iommufd_ioas_map`` makes before it looks the IOAS up."""
    op = "IOAS_MAP"
    if flags & ~int(KNOWN_FLAGS):
        raise _err(errno.EOPNOTSUPP, op, f"flags {flags:#x}: unknown bits")
    if iova >= uapi.ULONG_MAX or length >= uapi.ULONG_MAX:
        raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} length {length:#x}: >= ULONG_MAX")
    if not flags & ACCESS:
        raise _err(errno.EINVAL, op, "flags: expected READABLE and/or WRITEABLE")


def map_into(ioas: SimIoas, domains: int, reserved: list[tuple[int, int]],
             mapping: HostMapping, iova: int | None, flags: uapi.IoasMapFlags) -> int:
    """Map ``mapping`` at ``iova`` (or a free IOVA) after the header checks; return the IOVA."""
    op = "IOAS_MAP"
    length = mapping.length
    if length == 0:
        raise _err(errno.EINVAL, op, "length 0")
    align = iova_alignment(domains)
    if length % align:
        raise _err(errno.EINVAL, op, f"length {length:#x}: expected {align:#x} alignment")
    user_va = mapping.user_va
    if iova is None:
        iova = _alloc_iova(ioas, reserved, length, user_va, align)
    if iova % align:
        raise _err(errno.EINVAL, op, f"iova {iova:#x}: expected {align:#x} alignment")
    last = iova + length - 1
    if last > uapi.ULONG_MAX:
        raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} + length {length:#x} wraps")
    for low, high in reserved:
        if iova <= high and low <= last:
            raise _err(errno.EINVAL, op, f"[{iova:#x}, {last:#x}] meets reserved IOVA "
                                         f"[{low:#x}, {high:#x}] of IOAS {ioas.id}")
    m = _mapping_in(ioas, iova, last)
    if m is not None:
        raise _err(errno.EEXIST, op, f"[{iova:#x}, {last:#x}] overlaps [{m.iova:#x}, "
                                     f"{m.iova + m.length - 1:#x}] of IOAS {ioas.id}")
    if user_va % PAGE_SIZE % align:
        raise _err(errno.EINVAL, op, f"user address {user_va:#x}: its page offset is not "
                                     f"{align:#x}-aligned")
    ioas.maps.append(IoasMap(iova, length, mapping, flags, user_va % PAGE_SIZE))
    return iova


def _alloc_iova(ioas: SimIoas, reserved: list[tuple[int, int]], length: int, user_va: int,
                iopt_alignment: int) -> int:
    """``iopt_alloc_iova``: the first hole of ``[PAGE_SIZE, ULONG_MAX - PAGE_SIZE]`` left by
    the mappings and reservations that holds ``length`` bytes at an aligned start carrying
    the user address's page offset."""
    op = "IOAS_MAP"
    if length >= uapi.ULONG_MAX // 2:
        raise _err(errno.EOVERFLOW, op, f"length {length:#x}: too long to place")
    align = 1 << (length - 1).bit_length()  # roundup_pow_of_two
    if user_va:
        align = min(align, user_va & -user_va)
    align = min(align, MAX_ALLOC_ALIGNMENT)
    if align < iopt_alignment:
        raise _err(errno.EINVAL, op, f"length {length:#x} at {user_va:#x}: alignment "
                                     f"{align:#x} below the IOAS's {iopt_alignment:#x}")
    page_offset = user_va % PAGE_SIZE
    start, limit = PAGE_SIZE, uapi.ULONG_MAX - PAGE_SIZE
    used = sorted([(m.iova, m.iova + m.length - 1) for m in ioas.maps] + reserved)
    for low, high in [*used, (limit + 1, limit + 1)]:
        if low > start:
            last = min(low - 1, limit)
            aligned = (-(-start // align) * align) | page_offset
            if aligned < last and last - aligned >= length - 1:
                return aligned
        start = max(start, high + 1)
        if start > limit:
            break
    raise _err(errno.ENOSPC, op, f"no free IOVA for {length:#x} bytes in IOAS {ioas.id}")


def unmap_from(ioas: SimIoas, iova: int, length: int) -> int:
    """Unmap ``[iova, iova + length)`` (or everything); return the bytes unmapped."""
    op = "IOAS_UNMAP"
    everything = iova == 0 and length == uapi.U64_MAX
    if everything:
        last = uapi.ULONG_MAX
    else:
        if iova >= uapi.ULONG_MAX or length >= uapi.ULONG_MAX:
            raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} length {length:#x}: >= ULONG_MAX")
        if length == 0:
            raise _err(errno.EINVAL, op, "length 0")
        last = iova + length - 1
        if last > uapi.ULONG_MAX:
            raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} + length {length:#x} wraps")
    unmapped = 0
    for m in sorted(ioas.maps, key=lambda m: m.iova):
        m_last = m.iova + m.length - 1
        if m.iova > last or m_last < iova:
            continue
        if m.iova < iova or m_last > last:
            # iopt_unmap_iova_range never splits an area; what it removed before stays removed.
            raise _err(errno.ENOENT, op, f"[{iova:#x}, {last:#x}] would split mapping "
                                         f"[{m.iova:#x}, {m_last:#x}] ({unmapped:#x} unmapped)")
        ioas.maps.remove(m)
        unmapped += m.length
    if not unmapped and not everything:
        raise _err(errno.ENOENT, op, f"nothing mapped in [{iova:#x}, {last:#x}]")
    return unmapped
