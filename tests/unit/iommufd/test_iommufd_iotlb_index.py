"""The IOTLB's leaf index finds exactly what a scan of the whole table finds.

Random inserts (replacing, aligned and unaligned leaves of several sizes,
several VMIDs and ASIDs), deletions, pops and clears; after each, a TLBI range
query through the index must equal the scan's answer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsmmu.iommufd.sim import TLB_PAGE_SHIFT, TLB_PAGE_SIZE, Iotlb, TlbEntry

_VIEW = memoryview(bytearray(TLB_PAGE_SIZE))
VMIDS = [1, 2]
ASIDS = [0, 5]
PAGES = 1 << 10
LEAF_PAGES_LOG2 = [0, 2, 9]  # 4K, 16K, 2M
UNALIGNED_OFFSET = TLB_PAGE_SIZE


@st.composite
def entry(draw: st.DrawFn) -> tuple[tuple[int, int, int], TlbEntry]:
    page = draw(st.integers(0, PAGES))
    leaf_pages = 1 << draw(st.sampled_from(LEAF_PAGES_LOG2))
    base = (page & ~(leaf_pages - 1)) << TLB_PAGE_SHIFT
    if leaf_pages > 1 and draw(st.integers(0, 9)) == 0:
        base += UNALIGNED_OFFSET  # not aligned to its size: must still be found
    key = (draw(st.sampled_from(VMIDS)), draw(st.sampled_from(ASIDS)), page)
    return key, TlbEntry(base, leaf_pages << TLB_PAGE_SHIFT, _VIEW, 0, True)


operation = st.one_of(
    st.tuples(st.just("put"), entry()),
    st.tuples(st.just("del"), st.integers(0, 64)),
    st.tuples(st.just("pop"), st.integers(0, 64)),
    st.tuples(st.just("clear"), st.none()),
)
query = st.tuples(st.sampled_from(VMIDS), st.sampled_from([*ASIDS, None]),
                  st.integers(0, PAGES << TLB_PAGE_SHIFT),
                  st.sampled_from([1, TLB_PAGE_SIZE, 16 * TLB_PAGE_SIZE, 1 << 40]))


def scan(tlb: Iotlb, vmid: int, asid: int | None, start: int,
         end: int) -> set[tuple[int, int, int]]:
    return {k for k, e in tlb.items() if k[0] == vmid and (asid is None or k[1] == asid)
            and e.leaf_base < end and start < e.leaf_base + e.leaf_size}


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(operation, max_size=40), queries=st.lists(query, min_size=1, max_size=4))
def test_overlapping_equals_a_full_scan(ops: list[tuple[str, object]],
                                        queries: list[tuple[int, int | None, int, int]]) -> None:
    tlb = Iotlb()
    for kind, arg in ops:
        keys = list(tlb)
        if kind == "put":
            assert isinstance(arg, tuple)
            key, value = arg
            tlb[key] = value
        elif kind in ("del", "pop") and keys:
            assert isinstance(arg, int)
            key = keys[arg % len(keys)]
            if kind == "del":
                del tlb[key]
            else:
                tlb.pop(key)
        elif kind == "clear":
            tlb.clear()
        for vmid, asid, start, length in queries:
            found = tlb.overlapping(vmid, asid, start, start + length)
            assert len(found) == len(set(found))
            assert set(found) == scan(tlb, vmid, asid, start, start + length)


def test_pop_default_and_refused_mutators() -> None:
    tlb = Iotlb()
    sentinel = TlbEntry(0, TLB_PAGE_SIZE, _VIEW, 0, False)
    assert tlb.pop((1, 0, 0), sentinel) is sentinel
    with pytest.raises(KeyError):
        tlb.pop((1, 0, 0))
    with pytest.raises(TypeError):
        tlb.update({(1, 0, 0): sentinel})
    with pytest.raises(TypeError):
        tlb.setdefault((1, 0, 0), sentinel)
