"""The sim's IOTLB: 4K pages of stage-1 leaves resolved to host memory.

Entries are tagged (VMID, ASID, VA 4K page) and hold the final host location
of that page, as a combined S1+S2 TLB does; :class:`Iotlb` also indexes them
by stage-1 leaf so a TLBI by address finds its victims without a scan.
"""

from __future__ import annotations

from dataclasses import dataclass

TLB_PAGE_SHIFT = 12
"""The IOTLB's page: 4K, whatever the granule of the leaf it came from."""
TLB_PAGE_SIZE = 1 << TLB_PAGE_SHIFT
TLB_PAGE_MASK = TLB_PAGE_SIZE - 1
TLB_CAPACITY = 8192
"""Entries kept before the oldest is evicted."""


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """One IOTLB entry: a 4K page of a stage-1 leaf, resolved to host memory."""

    leaf_base: int
    leaf_size: int
    view: memoryview
    offset: int
    writable: bool


TlbKey = tuple[int, int, int]
"""An IOTLB tag: (VMID, ASID, 4K VA page number)."""


class Iotlb(dict[TlbKey, TlbEntry]):
    """The IOTLB: :data:`TlbKey` -> :class:`TlbEntry`, in insertion order (oldest first).

    A plain dict for lookups, plus an index of its entries by stage-1 leaf
    ``(VMID, leaf size, leaf base)`` kept up to date by every insert and
    removal, so a TLBI by address finds its victims without scanning the
    whole table.  Only ``[]=``, ``del``, :meth:`pop` and :meth:`clear` may
    change it (the other dict mutators are refused).
    """

    def __init__(self) -> None:
        super().__init__()
        self._leaves: dict[tuple[int, int, int], set[TlbKey]] = {}
        self._sizes: dict[int, int] = {}  # leaf size -> entries of that size (aligned leaves)
        self._unaligned: set[TlbKey] = set()  # leaves not aligned to their size: scanned

    def __setitem__(self, key: TlbKey, entry: TlbEntry) -> None:
        old = self.get(key)
        if old is not None:
            self._unindex(key, old)
        super().__setitem__(key, entry)
        size, base = entry.leaf_size, entry.leaf_base
        if size <= 0 or base % size:
            self._unaligned.add(key)
            return
        self._leaves.setdefault((key[0], size, base), set()).add(key)
        self._sizes[size] = self._sizes.get(size, 0) + 1

    def __delitem__(self, key: TlbKey) -> None:
        entry = self[key]
        super().__delitem__(key)
        self._unindex(key, entry)

    def pop(self, key: TlbKey, *default: TlbEntry) -> TlbEntry:  # type: ignore[override]
        """Remove ``key`` and return its entry (or ``default``); KeyError without one."""
        entry = self.get(key)
        if entry is None:
            if default:
                return default[0]
            raise KeyError(key)
        del self[key]
        return entry

    def clear(self) -> None:
        """Drop every entry."""
        super().clear()
        self._leaves.clear()
        self._sizes.clear()
        self._unaligned.clear()

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("Iotlb: only []=, del, pop and clear keep the leaf index right")

    update = setdefault = popitem = __ior__ = _refuse  # type: ignore[assignment]

    def _unindex(self, key: TlbKey, entry: TlbEntry) -> None:
        if key in self._unaligned:
            self._unaligned.discard(key)
            return
        leaf = (key[0], entry.leaf_size, entry.leaf_base)
        keys = self._leaves[leaf]
        keys.discard(key)
        if not keys:
            del self._leaves[leaf]
        left = self._sizes[entry.leaf_size] - 1
        if left:
            self._sizes[entry.leaf_size] = left
        else:
            del self._sizes[entry.leaf_size]

    def overlapping(self, vmid: int, asid: int | None, start: int, end: int) -> list[TlbKey]:
        """Keys of ``vmid`` (and ``asid``, unless None) whose leaf meets ``[start, end)``.

        Exactly the entries a scan testing ``leaf_base < end and start <
        leaf_base + leaf_size`` would pick; a range wider than the table is
        scanned instead of enumerated.
        """
        found: list[TlbKey] = []
        leaves = self._leaves
        for size in self._sizes:
            first = start - start % size
            if (end - first) // size > len(self):
                return self._scan(vmid, asid, start, end)
            for base in range(first, end, size):
                keys = leaves.get((vmid, size, base))
                if keys:
                    found.extend(k for k in keys if asid is None or k[1] == asid)
        for key in self._unaligned:
            entry = self[key]
            if key[0] == vmid and (asid is None or key[1] == asid) \
                    and entry.leaf_base < end and start < entry.leaf_base + entry.leaf_size:
                found.append(key)
        return found

    def _scan(self, vmid: int, asid: int | None, start: int, end: int) -> list[TlbKey]:
        return [
            k
            for k, e in self.items()
            if k[0] == vmid
            and (asid is None or k[1] == asid)
            and e.leaf_base < end
            and start < e.leaf_base + e.leaf_size
        ]
