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

Not modelled: the kernel also requires the *user address*'s page offset to
meet the alignment once a domain exists (``iopt_insert_area``); the sim's
mappings are Python buffers (tests map ``bytearray`` s), so it checks IOVA and
length only.
"""

from __future__ import annotations

import errno

from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim.objects import IoasMap, SimIoas
from vsmmu.iommufd.sim.objects import sim_error as _err

PAGE_SIZE = 4096
"""The host's PAGE_SIZE: the IOVA alignment of an IOAS with a domain."""
UNALIGNED = 1
"""The IOVA alignment of an IOAS with no domain (``iopt_init_table``)."""
ACCESS = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE
KNOWN_FLAGS = uapi.IoasMapFlags.FIXED_IOVA | ACCESS


def iova_alignment(domains: int) -> int:
    """The IOVA alignment of an IOAS holding ``domains`` paging domains."""
    return PAGE_SIZE if domains else UNALIGNED


def check_domain_addable(ioas: SimIoas, domains: int) -> None:
    """``iopt_check_iova_alignment`` when a domain joins: EADDRINUSE for an unaligned area."""
    align = iova_alignment(domains + 1)
    if align == iova_alignment(domains):
        return
    for m in ioas.maps:
        if (m.iova | m.length) % align:
            raise _err(errno.EADDRINUSE, "HWPT_ALLOC",
                       f"IOAS {ioas.id} maps [{m.iova:#x}, +{m.length:#x}) off the page grid")


def check_map_header(flags: int, iova: int, length: int) -> None:
    """The checks ``iommufd_ioas_map`` makes before it looks the IOAS up."""
    op = "IOAS_MAP"
    if flags & ~int(KNOWN_FLAGS):
        raise _err(errno.EOPNOTSUPP, op, f"flags {flags:#x}: unknown bits")
    if iova >= uapi.ULONG_MAX or length >= uapi.ULONG_MAX:
        raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} length {length:#x}: >= ULONG_MAX")
    if not flags & ACCESS:
        raise _err(errno.EINVAL, op, "flags: expected READABLE and/or WRITEABLE")


def map_into(ioas: SimIoas, domains: int, mapping: HostMapping, iova: int | None,
             flags: uapi.IoasMapFlags) -> int:
    """Map ``mapping`` at ``iova`` (or a free IOVA) after the header checks; return the IOVA."""
    op = "IOAS_MAP"
    length = mapping.length
    if length == 0:
        raise _err(errno.EINVAL, op, "length 0")
    align = iova_alignment(domains)
    if length % align:
        raise _err(errno.EINVAL, op, f"length {length:#x}: expected {align:#x} alignment")
    if iova is None:
        iova = _free_iova(ioas, length)
    if iova % align:
        raise _err(errno.EINVAL, op, f"iova {iova:#x}: expected {align:#x} alignment")
    last = iova + length - 1
    if last > uapi.ULONG_MAX:
        raise _err(errno.EOVERFLOW, op, f"iova {iova:#x} + length {length:#x} wraps")
    for m in ioas.maps:
        if iova < m.iova + m.length and m.iova <= last:
            raise _err(errno.EEXIST, op, f"[{iova:#x}, {last:#x}] overlaps [{m.iova:#x}, "
                                         f"{m.iova + m.length - 1:#x}] of IOAS {ioas.id}")
    ioas.maps.append(IoasMap(iova, length, mapping, flags))
    return iova


def _free_iova(ioas: SimIoas, length: int) -> int:
    iova = PAGE_SIZE
    for m in sorted(ioas.maps, key=lambda m: m.iova):
        if iova + length <= m.iova:
            break
        iova = max(iova, -(-(m.iova + m.length) // PAGE_SIZE) * PAGE_SIZE)
    return iova


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
