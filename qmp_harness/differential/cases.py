"""The scenarios: QEMU's own iommu-smmuv3 qtest cases, ported, and generated ones.

Ported (``tests/qtest/iommu-smmuv3-test.c`` with ``libqos/qos-smmuv3.c``, QEMU
11.1): the same addresses, STE/CD/descriptor values and register sequence
(GBPA update, CR1, queues of 2^10, linear table of 32 STEs, CR0=0xd in one
write, no command), then one 4-byte DMA at IOVA 0x8080604567.  ``ns-s1-only``
applies to a stage-1 vSMMU; ``ns-s2-only`` and ``ns-nested`` need stage 2,
which our vSMMU does not advertise (IDR0.S2P=0), so they run on QEMU only.

Generated (:func:`scenarios`, a hypothesis strategy): successful stage-1
translations over 4K/16K/64K granules, every input size, pages and blocks,
AP/AF/HA/AFFD, linear and 2-level stream tables, the configuration and walk
faults, and stale-TLB sequences.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from qmp_harness.differential import smmu
from qmp_harness.differential.scenario import (
    Action,
    Dma,
    Enable,
    Issue,
    Memory,
    Register,
    Scenario,
    Setup,
    TableBuilder,
    linear_cfg,
    sequence,
    ste_writes,
    two_level_cfg,
)
from qmp_harness.differential.smmu import (
    GRANULES,
    Cd,
    Cmd,
    Granule,
    Layout,
    Leaf,
    Ste,
    SteConfig,
    command,
)
from qmp_harness.differential.targets import TESTDEV_SID
from qmp_harness.qtest import VIRT_RAM

SID = TESTDEV_SID
LAYOUT = Layout()
#: An address with nothing behind it on virt (above the 512 GiB high PCIe MMIO window at
#: 0x80_0000_0000), inside the 44-bit OAS of both SMMUs.
UNBACKED = 0x100_0000_0000

# -- ported from QEMU's iommu-smmuv3 qtest ----------------------------------------------

_Q_OFFSET = VIRT_RAM
_Q_IOVA = 0x0080_8060_4567
_Q_VTTB = 0x0E4D_0000 + _Q_OFFSET
_Q_STRTAB = 0x0E17_9000 + _Q_OFFSET
_Q_CD = _Q_STRTAB - 0x40
_Q_CMDQ = 0x0E16_B000 + _Q_OFFSET
_Q_EVTQ = 0x0E17_0000 + _Q_OFFSET
_Q_TABLES = [0x0E4D_1000 + _Q_OFFSET, 0x0E4D_2000 + _Q_OFFSET, 0x0E4D_3000 + _Q_OFFSET]
_Q_PAGE = 0x0ECB_A000 + _Q_OFFSET
_Q_NON_LEAF = 0x8000_0000_0000_0003
_Q_LEAF_RW = 0x0400_0000_0000_0763
_Q_LEAF_RO = 0x0400_0000_0000_07E3
_Q_QUEUE_LOG2 = 0x0A
_Q_CR0 = smmu.CR0_SMMUEN | smmu.CR0_EVENTQEN | smmu.CR0_CMDQEN
#: Scratch from the command queue to the last table; the event queue of 2^10 records.
_Q_LAYOUT = Layout(strtab=_Q_CMDQ, cmdq=_Q_CMDQ, evtq=_Q_EVTQ, evtq_log2=_Q_QUEUE_LOG2,
                   cmdq_log2=_Q_QUEUE_LOG2, tables_end=_Q_VTTB + 0x4000, output=_Q_PAGE,
                   output_size=0x1000)


_Q_PTE_MASK = 0x0000_FFFF_FFFF_F000
_Q_TABLE_VALUES = [t | _Q_NON_LEAF for t in _Q_TABLES]


def _q_slot(table: int, level: int, address: int) -> int:
    return (table & _Q_PTE_MASK) + 8 * Granule(12).index(address, level)


def _q_s2_walk(ipa: int, final: bool) -> list[tuple[int, int]]:
    """QEMU's stage-2 walk for ``ipa`` in the shared tables: ipa maps to itself."""
    tables = [_Q_VTTB, *_Q_TABLE_VALUES]
    writes = [(_q_slot(tables[level], level, ipa), tables[level + 1]) for level in range(3)]
    leaf = (ipa & _Q_PTE_MASK) | (_Q_LEAF_RO if final else _Q_LEAF_RW)
    return [*writes, (_q_slot(tables[3], 3, ipa), leaf)]


def _q_tables(address: int, *, is_cd: bool, leaf_attrs: int) -> list[tuple[int, int]]:
    """``qsmmu_setup_translation_tables``: the stage-1 walk of ``address`` (each table
    entry's own address also mapped by stage 2), then the final stage-2 walk."""
    writes: list[tuple[int, int]] = []
    if not is_cd:
        tables = [_Q_VTTB, *_Q_TABLE_VALUES]
        leaf = _Q_PAGE | leaf_attrs
        values = [*_Q_TABLE_VALUES, leaf]
        for level in range(4):
            slot = _q_slot(tables[level], level, address)
            writes += _q_s2_walk(slot, final=False)
            writes.append((slot, values[level]))
    else:
        leaf = address | _Q_NON_LEAF
    return writes + _q_s2_walk(leaf, final=not is_cd)


def ported_case(mode: str) -> Scenario:
    """``/iommu-testdev/translation/ns-<mode>`` (mode: s1-only, s2-only, nested)."""
    config = {"s1-only": SteConfig.S1_TRANS, "s2-only": SteConfig.S2_TRANS,
              "nested": SteConfig.NESTED}[mode]
    word2, word3 = smmu.s2_words(vttb=_Q_VTTB)
    entry = Ste(config=config, s1_context_ptr=_Q_CD, s1cir=0, s1cor=0, s1csh=0,
                word2=word2, word3=word3)
    writes: list[tuple[int, bytes]] = [(_Q_STRTAB + SID * smmu.STE_BYTES, smmu.ste(entry))]
    if config != SteConfig.S2_TRANS:
        descriptor = Cd(ttb0=_Q_VTTB, t0sz=0x10, ips=4, ir0=0, or0=0, sh0=0, mair=0)
        raw = bytearray(smmu.cd(descriptor))
        raw[8] |= 1  # NSCFG0
        raw[16] |= 1  # NSCFG1
        writes.append((_Q_CD, bytes(raw)))
    leaf_attrs = _Q_LEAF_RO if config == SteConfig.S2_TRANS else _Q_LEAF_RW
    tables = _q_tables(_Q_IOVA, is_cd=False, leaf_attrs=leaf_attrs)
    if config == SteConfig.NESTED:
        # Stage 2 must also map the CD's IPA (QEMU walks CLASS=CD through it).
        tables += _q_tables(_Q_CD, is_cd=True, leaf_attrs=leaf_attrs)
    # Later writes win, as QEMU's sequence of qtest_writeq does.
    writes += [(slot, value.to_bytes(8, "little")) for slot, value in tables]
    gpa = _Q_PAGE + (_Q_IOVA & 0xFFF)
    actions = sequence(
        Memory(tuple(writes), "STE, CD, tables"),
        Register(smmu.GBPA, smmu.GBPA_UPDATE),
        Register(smmu.CR0, 0),
        Register(smmu.CR1, smmu.CR1_WB_ISH),
        Register(smmu.CMDQ_BASE, (_Q_CMDQ | _Q_QUEUE_LOG2) & smmu.DWORD),
        Register(smmu.CMDQ_BASE + 4, 0),
        Register(smmu.CMDQ_CONS, 0), Register(smmu.CMDQ_PROD, 0),
        Register(smmu.EVENTQ_BASE, (_Q_EVTQ | _Q_QUEUE_LOG2) & smmu.DWORD),
        Register(smmu.EVENTQ_BASE + 4, 0),
        Register(smmu.EVENTQ_PROD, 0), Register(smmu.EVENTQ_CONS, 0),
        Register(smmu.STRTAB_BASE_CFG, 5),
        Register(smmu.STRTAB_BASE, _Q_STRTAB & smmu.DWORD),
        Register(smmu.STRTAB_BASE + 4, 0),
        Register(smmu.CR0, _Q_CR0),
        Dma(_Q_IOVA, gpa, 4),
    )
    needs_s2 = config != SteConfig.S1_TRANS
    return Scenario(f"qtest/ns-{mode}", actions, kind=f"qtest-{mode}",
                    only="qemu" if needs_s2 else None,
                    only_reason="stage 2: our vSMMU is stage-1 only (IDR0.S2P=0)" if needs_s2
                    else "", layout=_Q_LAYOUT)


def ported_cases() -> list[Scenario]:
    """The three cases of QEMU's iommu-smmuv3 qtest."""
    return [ported_case(mode) for mode in ("s1-only", "s2-only", "nested")]


# -- generated ------------------------------------------------------------------------

#: Leaf levels with a block or page for each granule (48-bit OA, no FEAT_LPA2).
LEAF_LEVELS = {12: (1, 2, 3), 14: (2, 3), 16: (2, 3)}
CACHE_COMMANDS = ("none", "cfgi-all", "cfgi-ste-cd", "cfgi-ste-range")


@st.composite
def stream_table(draw: st.DrawFn) -> tuple[int, int | None]:
    """A STRTAB_BASE_CFG covering SID and the split (None: linear)."""
    if draw(st.booleans()):
        return linear_cfg(draw(st.integers(5, 8))), None
    split = draw(st.sampled_from((6, 8)))
    return two_level_cfg(draw(st.integers(split, split + 4)), split), split


@st.composite
def mapping(draw: st.DrawFn, granule: Granule, va_bits: int) -> tuple[int, int, int, int]:
    """(leaf level, VA of the leaf, output of the leaf, landing offset) inside the window."""
    start = granule.start_level(va_bits)
    level = draw(st.sampled_from([lv for lv in LEAF_LEVELS[granule.shift] if lv >= start]))
    size = 1 << granule.level_shift(level)
    land = LAYOUT.output + draw(st.integers(0, LAYOUT.output_size // 2 - 0x100))
    output = land & ~(size - 1)
    va = draw(st.integers(0, (1 << va_bits) // size - 1)) * size
    return level, va, output, land - output


def cache_commands(kind: str, asid: int) -> tuple[bytes, ...]:
    """The invalidation a driver issues before enabling, by name."""
    tlbi = command(Cmd.TLBI_NH_ASID, asid=asid)
    return {
        "none": (),
        "cfgi-all": (command(Cmd.CFGI_STE_RANGE, span=31), command(Cmd.TLBI_NSNH_ALL)),
        "cfgi-ste-cd": (command(Cmd.CFGI_STE, sid=SID, leaf=1),
                        command(Cmd.CFGI_CD, sid=SID, leaf=1), tlbi),
        "cfgi-ste-range": (command(Cmd.CFGI_STE_RANGE, sid=SID & ~0xF, span=4), tlbi),
    }[kind]


@st.composite
def leaf_attributes(draw: st.DrawFn) -> Leaf:
    """Mostly RW+AF; sometimes read-only, privileged-only, AF=0, software bits."""
    ap = draw(st.sampled_from((0b01, 0b01, 0b01, 0b00, 0b10, 0b11)))
    af = draw(st.sampled_from((1, 1, 1, 0)))
    extra = draw(st.sampled_from((0, 0, 0, 1 << 55, 1 << 58, 1 << 5)))
    return Leaf(ap=ap, af=af, ng=draw(st.integers(0, 1)), attr_index=draw(st.integers(0, 2)),
                extra=extra)


@st.composite
def translation(draw: st.DrawFn, kind: str = "translate") -> Scenario:
    """One stage-1 setup and one to three DMAs into the output window (module docstring).

    ``kind`` ``walk-fault`` adds one walk mutation; ``stale`` changes the mapping after
    the first DMA, DMAs again, invalidates and DMAs once more.
    """
    granule = draw(st.sampled_from(GRANULES))
    va_bits = draw(st.integers(25, 48))
    strtab_cfg, split = draw(stream_table())
    asid = draw(st.integers(0, 0xFFFF))
    ips = draw(st.sampled_from((0, 1, 2, 4, 5, 5, 5)))
    tables = TableBuilder(LAYOUT, granule, va_bits)
    level, va, output, offset = draw(mapping(granule, va_bits))
    leaf = draw(leaf_attributes()) if kind != "stale" else Leaf()
    leaf_slot = tables.map(va, output, level, leaf)
    size = 1 << granule.level_shift(level)
    length = draw(st.integers(1, 64))
    offset = min(offset, size - length)
    for _ in range(draw(st.integers(0, 2))):   # decoy mappings on other walks
        other_level, other_va, other_out, _ = draw(mapping(granule, va_bits))
        if other_va >> granule.level_shift(other_level) != va >> granule.level_shift(
                other_level) and (other_va >> granule.level_shift(level) != va
                                  >> granule.level_shift(level)):
            tables.map(other_va, other_out, other_level, Leaf())
    descriptor = Cd(ttb0=tables.root, t0sz=64 - va_bits, tg0=granule.tg0, ips=ips, asid=asid,
                    ha=draw(st.sampled_from((0, 0, 0, 0, 1))),
                    affd=draw(st.sampled_from((0, 0, 1))))
    ste_entry = Ste(s1_context_ptr=LAYOUT.cds, strw=draw(st.sampled_from((0, 0, 2))))
    iova = va + offset
    dmas: list[Action] = [Dma(iova, output + offset, length)]
    name = (f"{kind}/g{granule.size >> 10}k-va{va_bits}-L{level}-ap{leaf.ap}af{leaf.af}"
            f"-ips{ips}" + ("-ha" if descriptor.ha else "") + ("-affd" if descriptor.affd else ""))
    mutation: list[Action] = []
    if kind == "walk-fault":
        what = draw(st.sampled_from(("invalid", "invalid", "reserved-block", "beyond-va",
                                     "epd0", "output-beyond-ips", "table-beyond-ips",
                                     "table-unbacked", "ttb0-beyond-ips")))
        name += f"-{what}"
        descriptor, ste_entry, dmas = _walk_fault(draw, what, tables, descriptor, ste_entry,
                                                  va, iova, level, leaf_slot, length)
    cache = draw(st.sampled_from(CACHE_COMMANDS))
    extra_dmas: list[Action] = []
    if draw(st.booleans()):
        extra_dmas.append(Dma(iova ^ (1 << draw(st.integers(12, va_bits - 1))), output + offset, 4))
    if kind == "stale":
        mutation = _stale(draw, tables, granule, level, va, iova, output, offset, length,
                          leaf_slot, asid, descriptor)
        name += "-" + "-".join(a.what.replace(" ", "") for a in mutation
                               if isinstance(a, (Memory, Issue)))
    actions = sequence(
        Setup(strtab_cfg),
        Memory(ste_writes(LAYOUT, SID, smmu.ste(ste_entry), split=split), "STE"),
        Memory(((LAYOUT.cds, smmu.cd(descriptor)),), "CD"),
        Memory(tables.writes(), "tables"),
        Issue(cache_commands(cache, asid), cache),
        Enable(),
        dmas, extra_dmas, mutation)
    return Scenario(name, actions, kind=kind, unprivileged_leaf=not leaf.ap & 0b01)


def _walk_fault(draw: st.DrawFn, what: str, tables: TableBuilder, descriptor: Cd, entry: Ste,
                va: int, iova: int, level: int, leaf_slot: int, length: int
                ) -> tuple[Cd, Ste, list[Action]]:
    """Break the walk of ``iova`` one way; the DMAs that show it."""
    granule = tables.granule
    dma = Dma(iova, LAYOUT.output, length)
    if what == "invalid":
        broken = draw(st.integers(tables.start_level, level))
        slot = tables.slot(tables.table_for(va, broken), va, broken)
        tables.descriptors[slot] = draw(st.sampled_from((0, 0x2, 0xFFFF_FFFF_FFFF_FFFE)))
    elif what == "reserved-block":
        # A block where none may be: level 0 (any granule), level 1 (16K/64K), or a
        # level-3 descriptor with bits[1:0]=0b01.
        bad = {12: (0, 3), 14: (1, 3), 16: (1, 3)}[granule.shift]
        choice = draw(st.sampled_from([lv for lv in bad if lv >= tables.start_level] or [3]))
        slot = tables.slot(tables.table_for(va, choice), va, choice)
        tables.descriptors[slot] = LAYOUT.output & ~0xFFF | 0x401 if choice != 0 else 0x401
    elif what == "beyond-va":
        dma = Dma(iova | 1 << draw(st.integers(tables.va_bits, 63)), LAYOUT.output, length)
    elif what == "epd0":
        descriptor = dataclasses.replace(descriptor, epd0=1)
    elif what == "output-beyond-ips":
        bits = draw(st.integers(max(33, 0), 47))
        descriptor = dataclasses.replace(descriptor, ips=0)
        old = tables.descriptors[leaf_slot]
        tables.descriptors[leaf_slot] = old | 1 << bits
    elif what == "table-beyond-ips":
        broken = draw(st.integers(tables.start_level, max(tables.start_level, level - 1)))
        if broken < level:
            slot = tables.slot(tables.table_for(va, broken), va, broken)
            descriptor = dataclasses.replace(descriptor, ips=0)
            tables.descriptors[slot] |= 1 << draw(st.integers(33, 47))
    elif what == "table-unbacked":
        broken = draw(st.integers(tables.start_level, max(tables.start_level, level - 1)))
        if broken < level:
            slot = tables.slot(tables.table_for(va, broken), va, broken)
            tables.descriptors[slot] = smmu.table_desc(UNBACKED)
    elif what == "ttb0-beyond-ips":
        descriptor = dataclasses.replace(descriptor, ips=0, ttb0=descriptor.ttb0 | 1 << 33)
    return descriptor, entry, [dma]


def _stale(draw: st.DrawFn, tables: TableBuilder, granule: Granule, level: int, va: int,
           iova: int, output: int, offset: int, length: int, leaf_slot: int, asid: int,
           descriptor: Cd) -> list[Action]:
    """Change the leaf, DMA (old or new translation allowed), invalidate, DMA again."""
    size = 1 << granule.level_shift(level)
    moved = output + size if output + size + offset + length <= (
        LAYOUT.output + LAYOUT.output_size) and level == 3 else output
    change = draw(st.sampled_from(("remap", "invalid", "read-only", "af-clear")))
    if change == "remap" and moved == output:
        change = "invalid"
    new_leaf = {
        "remap": smmu.leaf_desc(moved, Leaf(), page=level == 3),
        "invalid": 0,
        "read-only": smmu.leaf_desc(output, Leaf(ap=0b11), page=level == 3),
        "af-clear": smmu.leaf_desc(output, Leaf(af=0), page=level == 3),
    }[change]
    tlbi = draw(st.sampled_from(("nh-va", "nh-va-nonleaf", "nh-vaa", "nh-asid", "nh-all",
                                 "nsnh-all", "other-asid", "none")))
    invalidation = {
        "nh-va": (command(Cmd.TLBI_NH_VA, asid=asid, address=iova, leaf=1),),
        "nh-va-nonleaf": (command(Cmd.TLBI_NH_VA, asid=asid, address=iova),),
        "nh-vaa": (command(Cmd.TLBI_NH_VAA, address=iova, leaf=1),),
        "nh-asid": (command(Cmd.TLBI_NH_ASID, asid=asid),),
        "nh-all": (command(Cmd.TLBI_NH_ALL),),
        "nsnh-all": (command(Cmd.TLBI_NSNH_ALL),),
        "other-asid": (command(Cmd.TLBI_NH_ASID, asid=asid ^ 1),),
        "none": (),
    }[tlbi]
    fresh = tlbi not in ("other-asid", "none")
    target = moved + offset if change == "remap" else output + offset
    return [
        Memory(((leaf_slot, new_leaf.to_bytes(8, "little")),), f"leaf -> {change}"),
        Dma(iova, target, length, may_be_stale=True),
        Issue(invalidation, f"tlbi {tlbi}"),
        Dma(iova, target, length, may_be_stale=not fresh),
    ]


def scenarios() -> st.SearchStrategy[Scenario]:
    """Every generated kind."""
    return st.one_of(translation("translate"), translation("walk-fault"), translation("stale"),
                     config_fault())


@st.composite
def config_fault(draw: st.DrawFn) -> Scenario:
    """A broken STE, CD, stream table or global setting in front of a valid stage-1 walk."""
    granule = Granule(12)
    tables = TableBuilder(LAYOUT, granule, 48)
    iova = 0x1234_5000 + draw(st.integers(0, 0xFC0))
    page = LAYOUT.output + 0x3000
    tables.map(iova, page, 3, Leaf())
    descriptor = Cd(ttb0=tables.root)
    entry = Ste(s1_context_ptr=LAYOUT.cds)
    strtab_cfg, split = draw(stream_table())
    span: int | None = None
    strtab_base: int | None = None
    cd_address = LAYOUT.cds
    extra: list[Action] = []
    gbpa = None
    what = draw(st.sampled_from((
        "ste-invalid", "ste-reserved-config", "ste-abort", "ste-bypass", "ste-s1fmt",
        "ste-s1cdmax", "ste-eats", "sid-beyond-linear", "l1-span", "strtab-unbacked",
        "l2-unbacked", "cd-unbacked", "cd-invalid", "cd-aa64", "cd-t0sz", "cd-tg0", "cd-ips",
        "gbpa-abort", "gbpa-bypass", "evtq-off", "cd-ttb0-unbacked")))
    evtq = True
    enable = True
    gpa = page + (iova & 0xFFF)
    if what == "ste-invalid":
        entry = dataclasses.replace(entry, valid=0)
    elif what == "ste-reserved-config":
        entry = dataclasses.replace(entry, config=draw(st.sampled_from((1, 2, 3))))
    elif what == "ste-abort":
        entry = dataclasses.replace(entry, config=SteConfig.ABORT)
    elif what == "ste-bypass":
        entry = dataclasses.replace(entry, config=SteConfig.BYPASS)
        iova = gpa = LAYOUT.output + draw(st.integers(0, 0x1000))
    elif what == "ste-s1fmt":
        entry = dataclasses.replace(entry, s1fmt=draw(st.integers(1, 3)))
    elif what == "ste-s1cdmax":
        entry = dataclasses.replace(entry, s1cdmax=draw(st.integers(1, 20)),
                                    s1dss=draw(st.integers(0, 3)),
                                    s1fmt=draw(st.integers(0, 2)))
    elif what == "ste-eats":
        entry = dataclasses.replace(entry, eats=draw(st.integers(1, 3)))
    elif what == "sid-beyond-linear":
        strtab_cfg, split = linear_cfg(draw(st.integers(0, 4))), None
    elif what == "l1-span":
        if split is None:
            strtab_cfg, split = two_level_cfg(8, 6), 6
        span = draw(st.sampled_from((0, 0, split + 2, 12, 31)))
    elif what == "strtab-unbacked":
        strtab_base = UNBACKED
    elif what == "l2-unbacked":
        if split is None:
            strtab_cfg, split = two_level_cfg(8, 6), 6
        extra.append(Memory(((LAYOUT.strtab + 8 * (SID >> split),
                              smmu.l1_std(UNBACKED, split + 1)),), "L1 -> unbacked"))
    elif what == "cd-unbacked":
        entry = dataclasses.replace(entry, s1_context_ptr=UNBACKED)
    elif what == "cd-invalid":
        descriptor = dataclasses.replace(descriptor, valid=0)
    elif what == "cd-aa64":
        descriptor = dataclasses.replace(descriptor, aa64=0)
    elif what == "cd-t0sz":
        descriptor = dataclasses.replace(descriptor, t0sz=draw(st.sampled_from((0, 8, 15, 40,
                                                                                 48, 63))))
    elif what == "cd-tg0":
        descriptor = dataclasses.replace(descriptor, tg0=3)
    elif what == "cd-ips":
        descriptor = dataclasses.replace(descriptor, ips=draw(st.sampled_from((6, 7))))
    elif what == "cd-ttb0-unbacked":
        descriptor = dataclasses.replace(descriptor, ttb0=UNBACKED)
    elif what == "gbpa-abort":
        gbpa, enable, iova = smmu.GBPA_UPDATE | smmu.GBPA_ABORT, False, gpa
    elif what == "gbpa-bypass":
        gbpa, enable, iova = smmu.GBPA_UPDATE, False, gpa
    elif what == "evtq-off":
        evtq = False
        iova += 0x10_0000
    cache = draw(st.sampled_from(CACHE_COMMANDS))
    actions = sequence(
        Setup(strtab_cfg, strtab_base, evtq=evtq),
        Memory(ste_writes(LAYOUT, SID, smmu.ste(entry), split=split, span=span), "STE"),
        extra,
        Memory(((cd_address, smmu.cd(descriptor)),), "CD"),
        Memory(tables.writes(), "tables"),
        Issue(cache_commands(cache, descriptor.asid), cache),
        [Register(smmu.GBPA, gbpa)] if gbpa is not None else [],
        [Enable()] if enable else [],
        Dma(iova, gpa, draw(st.integers(1, 32))))
    if what == "cd-ips":
        return Scenario(f"config/{what}", actions, kind=f"config-{what}", only="vsmmu",
                        only_reason="QEMU 11.1.3 aborts on CD.IPS=0b110/0b111 (oas2bits: "
                        "'code should not be reached'); IHI 0070 §5.4 IPS: 52 bits, capped to OAS")
    return Scenario(f"config/{what}", actions, kind=f"config-{what}")
