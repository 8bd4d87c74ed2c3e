"""The sim's physical SMMU: nested walks, faults and their events, IOTLB staleness."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsmmu.arch.cd import CD, Tg0
from vsmmu.arch.commands import CMD, CmdOpcode, TlbiTg
from vsmmu.arch.events import Event, EventClass, EventId, decode_event
from vsmmu.arch.fields import Field
from vsmmu.arch.pagetables import DESC, Ap
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import DmaFault, HostMapping
from vsmmu.iommufd.sim import SimIommufd

HEADER = uapi.VEVENT_HEADER_SIZE

RAM_IPA = 0x4000_0000
RAM_SIZE = 8 << 20
VSID = 0x21
PSID = 0x1000
ASID = 7
IPS_48 = 5
T0SZ_48 = 16
LEAF = DESC.VALID.place(1) | DESC.AF.place(1) | DESC.AP.place(Ap.RW_ANY)
PAGE = DESC.TYPE.place(1)
RDONLY = DESC.AP.place(Ap.RO_ANY)


class Guest:
    """A nested setup with guest RAM the tests write tables into."""

    def __init__(self, tg0: int = Tg0.GRANULE_4K) -> None:
        self.sim = SimIommufd()
        self.ram = mmap.mmap(-1, RAM_SIZE)  # page-aligned, as the kernel wants it
        self.dev = self.sim.create_mock_device(PSID)
        ioas = self.sim.ioas_alloc()
        self.sim.ioas_map(ioas, HostMapping(self.ram), iova=RAM_IPA)
        s2 = self.sim.hwpt_alloc(self.dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
        self.viommu = self.sim.viommu_alloc(self.dev, s2)
        self.sim.vdevice_alloc(self.viommu, self.dev, VSID)
        self.q = self.sim.veventq_alloc(self.viommu, 16)
        self.cd_ipa = RAM_IPA
        self.ttb = RAM_IPA + 0x10000
        w0 = CD.V.put(0, 1)
        w0 = CD.AA64.put(w0, 1)
        w0 = CD.T0SZ.put(w0, T0SZ_48)
        w0 = CD.TG0.put(w0, tg0)
        w0 = CD.EPD1.put(w0, 1)
        w0 = CD.IPS.put(w0, IPS_48)
        w0 = CD.ASID.put(w0, ASID)
        self.put(self.cd_ipa, w0)
        self.put(self.cd_ipa + 8, CD.TTB0.put(0, self.ttb))

    def put(self, ipa: int, value: int) -> None:
        off = ipa - RAM_IPA
        self.ram[off : off + 8] = value.to_bytes(8, "little")

    def attach(self, v: int = 1, cfg: int = SteConfig.S1_TRANS) -> None:
        w0 = STE.V.put(0, v)
        w0 = STE.CONFIG.put(w0, cfg)
        w0 = STE.S1CONTEXTPTR.put(w0, self.cd_ipa)
        hwpt = self.sim.hwpt_alloc(self.dev, self.viommu, data=(w0, 0))
        self.sim.device_attach(self.dev, hwpt)

    def events(self) -> list[tuple[int, Event]]:
        out: list[tuple[int, Event]] = []
        while rec := self.sim.veventq_read(self.q.fd, HEADER + uapi.VEVENT_ARM_SMMUV3_SIZE):
            out.append((int.from_bytes(rec[:4], "little"), decode_event(rec[HEADER:])))
        return out

    def tlbi(self, opcode: int, **fields: int) -> None:
        w0, w1 = CMD.OPCODE.put(0, opcode), 0
        for name, value in fields.items():
            f = getattr(CMD, name)
            if f.word == 0:
                w0 = f.put(w0, value)
            else:
                w1 = f.put(w1, value)
        assert self.sim.hwpt_invalidate(self.viommu, [(w0, w1)]) == 1


def table(addr: int) -> int:
    return addr | DESC.VALID.place(1) | DESC.TYPE.place(1)


def build_4k(g: Guest, va: int, out: int) -> None:
    """4-level 4K tables for ``va`` -> page ``out``; tables at ttb, +4K, +8K, +12K."""
    tables = [g.ttb + i * 0x1000 for i in range(4)]
    for level in range(3):
        idx = (va >> (39 - 9 * level)) & 0x1FF
        g.put(tables[level] + idx * 8, table(tables[level + 1]))
    g.put(tables[3] + ((va >> 12) & 0x1FF) * 8, out | LEAF | PAGE)


def test_4k_four_level_page_translates() -> None:
    g = Guest()
    va, out = 0x12_3456_7000, RAM_IPA + 0x20_0000
    build_4k(g, va, out)
    g.attach()
    g.ram[0x20_0010 : 0x20_0014] = b"ABCD"
    assert g.sim.dma_read(g.dev, va + 0x10, 4) == b"ABCD"
    g.sim.dma_write(g.dev, va + 0x20, b"xy")
    assert g.ram[0x20_0020:0x20_0022] == b"xy"


def test_4k_level2_block_translates() -> None:
    g = Guest()
    va = 0x8000_0000 + 0x20_0000  # a 2 MiB block at level 2
    l1, l2 = g.ttb + 0x1000, g.ttb + 0x2000
    g.put(g.ttb + ((va >> 39) & 0x1FF) * 8, table(l1))
    g.put(l1 + ((va >> 30) & 0x1FF) * 8, table(l2))
    g.put(l2 + ((va >> 21) & 0x1FF) * 8, (RAM_IPA + 0x40_0000) | LEAF)
    g.attach()
    g.ram[0x40_0000 + 0x1_2345] = 0x5A
    assert g.sim.dma_read(g.dev, va + 0x1_2345, 1) == b"\x5a"


def test_64k_three_level_page_and_block_translate() -> None:
    g = Guest(Tg0.GRANULE_64K)
    l2, l3 = g.ttb + 0x1_0000, g.ttb + 0x2_0000
    page_va = 0x0000_0040_1234_0000
    g.put(g.ttb + ((page_va >> 42) & 0x3F) * 8, table(l2))
    g.put(l2 + ((page_va >> 29) & 0x1FFF) * 8, table(l3))
    g.put(l3 + ((page_va >> 16) & 0x1FFF) * 8, (RAM_IPA + 0x50_0000) | LEAF | PAGE)
    block_va = (page_va & ~((1 << 29) - 1)) + (1 << 29)  # next level-2 entry: 512 MiB block
    g.put(l2 + ((block_va >> 29) & 0x1FFF) * 8, RAM_IPA | LEAF)
    g.attach()
    g.ram[0x50_0000 + 0xFFFF] = 0x11
    g.ram[0x7_0000] = 0x22
    assert g.sim.dma_read(g.dev, page_va + 0xFFFF, 1) == b"\x11"
    assert g.sim.dma_read(g.dev, block_va + 0x7_0000, 1) == b"\x22"


def test_invalid_level2_descriptor_faults_with_f_translation_to_veventq() -> None:
    g = Guest()
    va = 0x12_3456_7000
    g.put(g.ttb + ((va >> 39) & 0x1FF) * 8, table(g.ttb + 0x1000))
    g.put(g.ttb + 0x1000 + ((va >> 30) & 0x1FF) * 8, table(g.ttb + 0x2000))
    g.attach()
    with pytest.raises(DmaFault) as info:
        g.sim.dma_read(g.dev, va, 4)
    assert info.value.delivered
    assert "level 2" in str(info.value)
    [(flags, ev)] = g.events()
    assert flags == 0
    assert ev.event_id == EventId.F_TRANSLATION
    assert ev.sid == VSID
    assert ev.fields["input_addr"] == va and ev.fields["rnw"] == 1
    assert ev.fields["class"] == EventClass.IN and ev.fields["s2"] == 0


def test_read_only_page_write_is_f_permission() -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8,
          (RAM_IPA + 0x20_0000) | LEAF | PAGE | RDONLY)
    g.attach()
    assert g.sim.dma_read(g.dev, va, 1) == b"\0"
    with pytest.raises(DmaFault) as info:
        g.sim.dma_write(g.dev, va, b"z")
    assert info.value.event is not None and info.value.event.event_id == EventId.F_PERMISSION
    assert info.value.event.fields["rnw"] == 0


def test_output_beyond_ips_is_f_addr_size() -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, 1 << 47)
    g.put(g.cd_ipa, CD.IPS.put(int.from_bytes(g.ram[0:8], "little"), 0))  # 32-bit IPA
    g.attach()
    with pytest.raises(DmaFault) as info:
        g.sim.dma_read(g.dev, va, 1)
    assert info.value.event is not None and info.value.event.event_id == EventId.F_ADDR_SIZE


def test_invalid_cd_is_c_bad_cd() -> None:
    g = Guest()
    g.put(g.cd_ipa, 0)
    g.attach()
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, 0x1000, 1)
    assert [ev.event_id for _, ev in g.events()] == [EventId.C_BAD_CD]


def test_v0_vste_transaction_is_c_bad_ste_with_vsid() -> None:
    g = Guest()
    g.attach(v=0)
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, 0x1000, 1)
    [(_, ev)] = g.events()
    assert ev.event_id == EventId.C_BAD_STE and ev.sid == VSID


def test_abort_vste_is_silent() -> None:
    g = Guest()
    g.attach(cfg=SteConfig.ABORT)
    with pytest.raises(DmaFault) as info:
        g.sim.dma_read(g.dev, 0x1000, 1)
    assert info.value.event is None and g.events() == []


def test_bypass_vste_uses_stage2_only() -> None:
    g = Guest()
    g.attach(cfg=SteConfig.BYPASS)
    g.ram[0x1234] = 9
    assert g.sim.dma_read(g.dev, RAM_IPA + 0x1234, 1) == b"\x09"


def test_stage2_fault_is_a_host_event() -> None:
    g = Guest()
    g.attach(cfg=SteConfig.BYPASS)
    with pytest.raises(DmaFault) as info:
        g.sim.dma_read(g.dev, 0x10, 1)
    assert not info.value.delivered and g.events() == []
    assert g.sim.smmu.host_events[-1].fields["s2"] == 1


def test_missing_tlbi_leaves_stale_translation_and_tlbi_removes_it() -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.ram[0x20_0000] = 1
    g.ram[0x30_0000] = 2
    g.attach()
    assert g.sim.dma_read(g.dev, va, 1) == b"\x01"
    # The guest remaps the page without invalidating: the IOTLB still holds the old one.
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8, (RAM_IPA + 0x30_0000) | LEAF | PAGE)
    assert g.sim.dma_read(g.dev, va, 1) == b"\x01"
    g.tlbi(CmdOpcode.TLBI_NH_VA, ASID=ASID + 1, VA=va)  # wrong ASID: still stale
    assert g.sim.dma_read(g.dev, va, 1) == b"\x01"
    g.tlbi(CmdOpcode.TLBI_NH_VA, ASID=ASID, VA=va)
    assert g.sim.dma_read(g.dev, va, 1) == b"\x02"


@pytest.mark.parametrize(
    "fields",
    [
        {"opcode": CmdOpcode.TLBI_NSNH_ALL},
        {"opcode": CmdOpcode.TLBI_NH_ASID, "ASID": ASID},
        {"opcode": CmdOpcode.TLBI_NH_VAA, "VA": 0x1000_0000},
        {"opcode": CmdOpcode.TLBI_NH_VA, "ASID": ASID, "VA": 0x0FFF_0000, "TG": TlbiTg.GRANULE_4K,
         "NUM": 31},
    ],
    ids=["nsnh_all", "nh_asid", "nh_vaa", "nh_va_range"],
)
def test_each_tlbi_form_removes_the_stale_entry(fields: dict[str, int]) -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.ram[0x30_0000] = 2
    g.attach()
    g.sim.dma_read(g.dev, va, 1)
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8, (RAM_IPA + 0x30_0000) | LEAF | PAGE)
    opcode = fields.pop("opcode")
    g.tlbi(opcode, **fields)
    assert g.sim.dma_read(g.dev, va, 1) == b"\x02"


def test_cd_is_cached_until_cfgi_cd() -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.attach()
    g.sim.dma_read(g.dev, va, 1)
    g.put(g.cd_ipa, 0)  # CD made invalid without CFGI_CD: still cached
    g.tlbi(CmdOpcode.TLBI_NSNH_ALL)
    g.sim.dma_read(g.dev, va, 1)
    g.tlbi(CmdOpcode.CFGI_CD, SID=VSID)
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, va, 1)


def test_hostile_tables_never_escape_as_raw_exceptions() -> None:
    g = Guest()
    for off in range(0x10000, 0x14000, 8):
        g.put(RAM_IPA + off, 0xFFFF_FFFF_FFFF_FFFF)
    g.attach()
    for va in (0, 0x1000, 0xFFFF_FFFF_F000, 1 << 63):
        with pytest.raises(DmaFault):
            g.sim.dma_read(g.dev, va, 8)


def test_dbm_bit_is_an_attribute_not_an_address_bit() -> None:
    """Bit 51 is DBM, not OA[51] (48-bit OA): a page carrying it still translates."""
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8,
          (RAM_IPA + 0x20_0000) | LEAF | PAGE | DESC.DBM.place(1))
    g.attach()
    g.ram[0x20_0000] = 0x77
    assert g.sim.dma_read(g.dev, va, 1) == b"\x77"


# --- the IOTLB-hit fast path keeps the slow path's meaning ---


def hot_page(g: Guest, va: int = 0x1000_0000) -> int:
    """Map ``va`` → RAM +2 MiB, attach, and make it an IOTLB hit; return its walk count."""
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.attach()
    g.sim.dma_read(g.dev, va, 8)
    return g.sim.smmu.walks


def test_repeated_hits_do_not_walk_again() -> None:
    g = Guest()
    walks = hot_page(g)
    for i in range(10):
        g.sim.dma_write(g.dev, 0x1000_0000 + i * 8, i.to_bytes(8, "little"))
        assert g.sim.dma_read(g.dev, 0x1000_0000 + i * 8, 8) == i.to_bytes(8, "little")
    assert g.sim.smmu.walks == walks
    assert g.ram[0x20_0000 + 9 * 8] == 9


def test_detach_after_hits_blocks_dma() -> None:
    g = Guest()
    hot_page(g)
    g.sim.device_detach(g.dev)
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, 0x1000_0000, 8)


def test_unmapping_stage2_after_hits_faults() -> None:
    g = Guest()
    hot_page(g)
    ioas = next(o.id for o in g.sim.objects() if o.type.value == "ioas")
    g.sim.ioas_unmap(ioas, 0, uapi.U64_MAX)
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, 0x1000_0000, 8)


def test_access_crossing_a_page_uses_both_translations() -> None:
    g = Guest()
    va = 0x1000_0000
    hot_page(g, va)
    next_va = va + 0x1000
    g.put(g.ttb + 0x3000 + ((next_va >> 12) & 0x1FF) * 8, (RAM_IPA + 0x50_0000) | LEAF | PAGE)
    g.ram[0x20_0FFE : 0x20_1000] = b"ab"
    g.ram[0x50_0000 : 0x50_0002] = b"cd"
    assert g.sim.dma_read(g.dev, va + 0xFFE, 4) == b"abcd"
    assert g.sim.dma_read(g.dev, va + 0xFFE, 4) == b"abcd"


def test_fast_path_write_to_read_only_page_still_faults() -> None:
    g = Guest()
    va = 0x1000_0000
    build_4k(g, va, RAM_IPA + 0x20_0000)
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8, (RAM_IPA + 0x20_0000) | LEAF | PAGE | RDONLY)
    g.attach()
    for _ in range(2):
        assert g.sim.dma_read(g.dev, va, 1) == b"\0"
    with pytest.raises(DmaFault):
        g.sim.dma_write(g.dev, va, b"z")
    assert g.ram[0x20_0000] == 0


# --- TLBI by address drops only the pages it invalidated from the fast path ---


def test_tlbi_by_address_keeps_other_hot_pages_and_drops_its_own() -> None:
    g = Guest()
    va, other = 0x1000_0000, 0x1000_1000
    hot_page(g, va)
    g.put(g.ttb + 0x3000 + ((other >> 12) & 0x1FF) * 8, (RAM_IPA + 0x40_0000) | LEAF | PAGE)
    g.sim.dma_read(g.dev, other, 8)
    walks = g.sim.smmu.walks
    g.ram[0x30_0000] = 2
    g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8, (RAM_IPA + 0x30_0000) | LEAF | PAGE)
    g.tlbi(CmdOpcode.TLBI_NH_VA, ASID=ASID, VA=va)
    g.sim.dma_read(g.dev, other, 8)
    assert g.sim.smmu.walks == walks  # the other page still hits
    assert g.sim.dma_read(g.dev, va, 1) == b"\x02"  # the invalidated one walks again
    assert g.sim.smmu.walks == walks + 1


# --- the walk cache: last-level tables kept across Leaf=1 TLBIs, dropped by the rest ---

WALK_VA = 0x1000_0000


@pytest.mark.parametrize(("opcode", "fields", "kept"), [
    (CmdOpcode.TLBI_NH_VA, {"ASID": ASID, "VA": WALK_VA, "LEAF": 1}, True),
    (CmdOpcode.TLBI_NH_VAA, {"VA": WALK_VA, "LEAF": 1}, True),
    (CmdOpcode.TLBI_NH_VA, {"ASID": ASID, "VA": WALK_VA, "LEAF": 0}, False),
    (CmdOpcode.TLBI_NH_VAA, {"VA": WALK_VA + 0x1000, "LEAF": 0}, False),
    (CmdOpcode.TLBI_NH_ASID, {"ASID": ASID}, False),
    (CmdOpcode.TLBI_NH_ALL, {}, False),
    (CmdOpcode.CFGI_CD, {"SID": VSID}, False),
])
def test_walk_cache_survives_only_leaf_tlbis(opcode: int, fields: dict[str, int],
                                             kept: bool) -> None:
    """The guest moves a level-2 descriptor to a new last-level table, then invalidates:
    after a Leaf=1 TLBI the next miss may still use the old table (IHI 0070 §4.4.1,
    Leaf), after anything else it must walk the new one."""
    g = Guest()
    hot_page(g, WALK_VA)  # RAM +2 MiB, through the last-level table at ttb + 12K
    g.ram[0x20_0000] = 1
    g.ram[0x30_0000] = 2
    moved = g.ttb + 0x4000
    g.put(moved + ((WALK_VA >> 12) & 0x1FF) * 8, (RAM_IPA + 0x30_0000) | LEAF | PAGE)
    g.put(g.ttb + 0x2000 + ((WALK_VA >> 21) & 0x1FF) * 8, table(moved))
    g.tlbi(opcode, **fields)
    g.tlbi(CmdOpcode.TLBI_NH_VA, ASID=ASID, VA=WALK_VA, LEAF=1)  # the IOTLB entry goes
    walks = g.sim.smmu.walks
    assert g.sim.dma_read(g.dev, WALK_VA, 1) == (b"\x01" if kept else b"\x02")
    assert g.sim.smmu.walks == walks + 1


def test_walk_cache_is_per_last_level_table() -> None:
    """A miss in another 2 MiB of VA walks its own tables, not the cached one's."""
    g = Guest()
    hot_page(g, WALK_VA)
    far = WALK_VA + 0x20_0000
    other = g.ttb + 0x4000
    g.put(other + ((far >> 12) & 0x1FF) * 8, (RAM_IPA + 0x30_0000) | LEAF | PAGE)
    g.put(g.ttb + 0x2000 + ((far >> 21) & 0x1FF) * 8, table(other))
    g.ram[0x30_0000] = 3
    assert g.sim.dma_read(g.dev, far, 1) == b"\x03"
    near = WALK_VA + 0x1000  # same last-level table as WALK_VA, no leaf: a fault
    with pytest.raises(DmaFault):
        g.sim.dma_read(g.dev, near, 1)


TLBI_FORMS = [
    (CmdOpcode.TLBI_NH_VA, True), (CmdOpcode.TLBI_NH_VAA, False),
    (CmdOpcode.TLBI_NH_ASID, True), (CmdOpcode.TLBI_NH_ALL, False),
]
HOT_PAGES = 4
BASE_VA = 0x1000_0000


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.integers(0, HOT_PAGES - 1),
                                st.integers(0, len(TLBI_FORMS) - 1), st.booleans()),
                      max_size=25))
def test_fast_path_reads_equal_slow_path_reads(steps: list[tuple[int, int, int, bool]]) -> None:
    """Remaps without TLBI, TLBIs of every form (right or wrong ASID) and reads: a sim
    whose fast path is emptied before every read returns the same bytes."""
    fast, slow = Guest(), Guest()
    for g in (fast, slow):
        build_4k(g, BASE_VA, RAM_IPA + 0x20_0000)
        for page in range(HOT_PAGES):
            g.put(g.ttb + 0x3000 + (((BASE_VA >> 12) + page) & 0x1FF) * 8,
                  (RAM_IPA + 0x20_0000 + page * 0x1000) | LEAF | PAGE)
            g.ram[0x20_0000 + page * 0x1000] = page
            g.ram[0x60_0000 + page * 0x1000] = 0x80 | page
        g.attach()
    for action, page, form, right_asid in steps:
        va = BASE_VA + page * 0x1000
        for g in (fast, slow):
            if action == 0:  # remap the page to its other frame, no invalidation
                g.put(g.ttb + 0x3000 + ((va >> 12) & 0x1FF) * 8,
                      (RAM_IPA + 0x60_0000 + page * 0x1000) | LEAF | PAGE)
            elif action == 1:
                opcode, has_asid = TLBI_FORMS[form]
                fields = {"VA": va} if opcode in (CmdOpcode.TLBI_NH_VA,
                                                  CmdOpcode.TLBI_NH_VAA) else {}
                if has_asid:
                    fields["ASID"] = ASID if right_asid else ASID + 1
                g.tlbi(opcode, **fields)
        if action == 2:
            slow.sim.smmu.fast.clear()
            assert fast.sim.dma_read(fast.dev, va, 1) == slow.sim.dma_read(slow.dev, va, 1)


# -- CD checks and AFFD, decided from IHI 0070 (found by the differential run vs QEMU) --------


def _cd_word0(g: Guest) -> int:
    return int.from_bytes(g.ram[0:8], "little")


@pytest.mark.parametrize("field", [CD.HA, CD.HD])
def test_cd_with_hardware_update_but_no_httu_is_c_bad_cd(field: Field) -> None:
    # §5.4 HA/HD: ILLEGAL when SMMU_IDR0.HTTU does not support them (this SMMU has none).
    g = Guest()
    build_4k(g, 0x5000, RAM_IPA + 0x20_0000)
    g.put(g.cd_ipa, field.put(_cd_word0(g), 1))
    g.attach()
    with pytest.raises(DmaFault):
        g.sim.dma_write(g.dev, 0x5000, b"x")
    assert [e.event_id for _, e in g.events()] == [EventId.C_BAD_CD]


def test_ttb0_beyond_ips_is_c_bad_cd_not_address_size() -> None:
    # §3.4: a CD.TTBx out of range of the effective IPS is C_BAD_CD, not F_ADDR_SIZE.
    g = Guest()
    g.put(g.cd_ipa, CD.IPS.put(_cd_word0(g), 0))  # 32 bits
    g.put(g.cd_ipa + 8, CD.TTB0.put(0, g.ttb | 1 << 33))
    g.attach()
    with pytest.raises(DmaFault):
        g.sim.dma_write(g.dev, 0x5000, b"x")
    assert [e.event_id for _, e in g.events()] == [EventId.C_BAD_CD]


def test_affd_takes_af_zero_as_one() -> None:
    # §5.4 AFFD=1: "An Access flag fault never occurs. The TTD.AF bit is considered to be 1."
    g = Guest()
    va, out = 0x7000, RAM_IPA + 0x20_0000
    build_4k(g, va, out)
    tables_l3 = g.ttb + 3 * 0x1000
    g.put(tables_l3 + 7 * 8, out | (LEAF & ~DESC.AF.place(1)) | PAGE)
    g.put(g.cd_ipa, CD.AFFD.put(_cd_word0(g), 1))
    g.attach()
    g.sim.dma_write(g.dev, va, b"ok")
    assert g.ram[0x20_0000:0x20_0002] == b"ok" and g.events() == []


def test_s1fmt_is_ignored_without_s1cdmax() -> None:
    # §5.2 S1Fmt: IGNORED when S1CDMax == 0; S1ContextPtr points at the one CD.
    g = Guest()
    build_4k(g, 0x5000, RAM_IPA + 0x20_0000)
    w0 = STE.S1FMT.put(STE.CONFIG.put(STE.V.put(0, 1), SteConfig.S1_TRANS), 1)
    hwpt = g.sim.hwpt_alloc(g.dev, g.viommu, data=(STE.S1CONTEXTPTR.put(w0, g.cd_ipa), 0))
    g.sim.device_attach(g.dev, hwpt)
    g.sim.dma_write(g.dev, 0x5000, b"ok")
    assert g.ram[0x20_0000:0x20_0002] == b"ok"
