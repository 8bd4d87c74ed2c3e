"""A scenario: a fixed list of actions run the same way on both targets, and what it observed.

Everything is resolved to data when the scenario is built (register
values, the bytes of every STE, CD and descriptor, each command, each DMA),
so a scenario prints, replays and compares exactly; :func:`run` executes it
on one target through :class:`~qmp_harness.differential.smmu.SmmuDriver`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from qmp_harness.differential import smmu
from qmp_harness.differential.smmu import DmaOutcome, Granule, Layout, Leaf, SmmuDriver
from qmp_harness.differential.targets import Target


@dataclasses.dataclass(frozen=True)
class Setup:
    """Program CR1, the stream table and the queues; enable the queues."""

    strtab_cfg: int
    strtab_base: int | None = None
    evtq: bool = True


@dataclasses.dataclass(frozen=True)
class Memory:
    """Store bytes in guest RAM (STEs, CDs, descriptors)."""

    writes: tuple[tuple[int, bytes], ...]
    what: str = ""


@dataclasses.dataclass(frozen=True)
class Issue:
    """Commands on the command queue, then CMD_SYNC."""

    commands: tuple[bytes, ...]
    what: str = ""


@dataclasses.dataclass(frozen=True)
class Register:
    """A raw 32-bit register write (e.g. GBPA, CR0 all at once)."""

    offset: int
    value: int


@dataclasses.dataclass(frozen=True)
class Enable:
    """Set CR0.SMMUEN."""


@dataclasses.dataclass(frozen=True)
class Dma:
    """One iommu-testdev DMA write of ``length`` bytes at ``iova``, expected at ``gpa``."""

    iova: int
    gpa: int
    length: int
    #: The mapping changed since the last DMA and no TLBI followed: the SMMU may use the
    #: old translation or the new one (IHI 0070 §16.2: caching is permitted, not required).
    may_be_stale: bool = False


Action = Setup | Memory | Issue | Register | Enable | Dma


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named list of actions; ``only`` names the one target that supports it, if so."""

    name: str
    actions: tuple[Action, ...]
    #: What the scenario is about (its fault or feature), for grouping in the summary.
    kind: str = ""
    #: A target that alone implements the feature ("qemu"): the other's outcome is not compared.
    only: str | None = None
    #: Why only that target supports it.
    only_reason: str = ""
    layout: Layout = dataclasses.field(default_factory=Layout)
    #: A leaf on a DMA's walk has AP[1]=0 (privileged only): QEMU ignores privilege.
    unprivileged_leaf: bool = False


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one target did: each DMA's RESULT, the event records, the output window."""

    dmas: tuple[DmaOutcome, ...]
    events: tuple[bytes, ...]
    window_digest: str
    gerror: int
    cmdq_error: int

    def describe(self) -> list[str]:
        """Readable lines."""
        lines = [str(d) for d in self.dmas]
        lines += [f"event {describe_event(e)}" for e in self.events]
        lines.append(f"output window sha256 {self.window_digest[:16]}  GERROR={self.gerror:#x}"
                     f"  CMDQ_CONS.ERR={self.cmdq_error:#x}")
        return lines


#: Registers whose write completes only when another (or the same) register says so.
COMPLETION_READS = {smmu.CR0: smmu.CR0ACK, smmu.GBPA: smmu.GBPA}


async def run(scenario: Scenario, target: Target) -> Observation:
    """Reset ``target``, clear the scratch RAM and perform the actions."""
    await target.reset()
    driver = SmmuDriver(target, scenario.layout)
    await driver.clear_scratch()
    dmas: list[DmaOutcome] = []
    for action in scenario.actions:
        if isinstance(action, Setup):
            await driver.setup_queues(strtab_cfg=action.strtab_cfg,
                                      strtab_base=action.strtab_base, evtq=action.evtq)
        elif isinstance(action, Memory):
            await driver.writes(action.writes)
        elif isinstance(action, Issue):
            await driver.issue(action.commands)
        elif isinstance(action, Register):
            await driver.write_reg(action.offset, action.value)
            if action.offset in COMPLETION_READS:
                # Software must see CR0ACK (or GBPA.Update clear) before relying on the
                # change (IHI 0070 §6.3.9, §6.3.14); on ours the read also orders the
                # posted write before a DMA that arrives on the endpoint's own socket.
                await driver.read_reg(COMPLETION_READS[action.offset])
        elif isinstance(action, Enable):
            await driver.enable()
        else:
            dmas.append(await driver.dma(action.iova, action.gpa, action.length))
    events = await driver.events()
    window = await driver.output_window()
    gerror = await driver.read_reg(smmu.GERROR)
    cons = await driver.read_reg(smmu.CMDQ_CONS)
    return Observation(tuple(dmas), tuple(events), hashlib.sha256(window).hexdigest(), gerror,
                       (cons >> smmu.CMDQ_CONS_ERR_SHIFT) & smmu.CMDQ_CONS_ERR_MASK)


# -- event records (IHI 0070 §7.3), decoded for reports and for comparing by field ----------

EVENT_NAMES = {0x01: "F_UUT", 0x02: "C_BAD_STREAMID", 0x03: "F_STE_FETCH", 0x04: "C_BAD_STE",
               0x05: "F_BAD_ATS_TREQ", 0x06: "F_STREAM_DISABLED", 0x07: "F_TRANSL_FORBIDDEN",
               0x08: "C_BAD_SUBSTREAMID", 0x09: "F_CD_FETCH", 0x0A: "C_BAD_CD",
               0x0B: "F_WALK_EABT", 0x10: "F_TRANSLATION", 0x11: "F_ADDR_SIZE",
               0x12: "F_ACCESS", 0x13: "F_PERMISSION", 0x20: "F_TLB_CONFLICT",
               0x21: "F_CFG_CONFLICT", 0x24: "E_PAGE_REQUEST", 0x25: "F_VMS_FETCH"}
_HEAD = (("ssv", 0, 11, 11), ("ssid", 0, 31, 12), ("sid", 0, 63, 32))
_ACCESS = (("stag", 1, 15, 0), ("stall", 1, 31, 31), ("pnu", 1, 33, 33), ("ind", 1, 34, 34),
           ("rnw", 1, 35, 35))
_WALK = (*_ACCESS, ("s2", 1, 39, 39), ("class", 1, 41, 40), ("input_addr", 2, 63, 0),
         ("ipa", 3, 51, 12))
#: The architecturally defined fields of each record this suite can provoke (§7.3.x).
EVENT_FIELDS: dict[int, tuple[tuple[str, int, int, int], ...]] = {
    0x02: (*_HEAD,),
    0x03: (*_HEAD, ("fetch_addr", 3, 51, 3)),
    0x04: (*_HEAD,),
    0x06: (*_HEAD,),
    0x08: (*_HEAD,),
    0x09: (*_HEAD, ("fetch_addr", 3, 51, 3)),
    0x0A: (*_HEAD,),
    0x0B: (*_WALK, ("fetch_addr", 3, 51, 3)),
    0x10: _WALK, 0x11: _WALK, 0x12: _WALK, 0x13: _WALK,
}


def event_fields(record: bytes) -> dict[str, int]:
    """The record's id and its architecturally defined fields (others are left out)."""
    words = [int.from_bytes(record[i:i + 8], "little") for i in range(0, smmu.EVENT_BYTES, 8)]
    event_id = words[0] & 0xFF
    fields = {"id": event_id}
    for name, word, high, low in EVENT_FIELDS.get(event_id, _HEAD):
        fields[name] = (words[word] >> low) & ((1 << (high - low + 1)) - 1)
    return fields


def encode_fields(fields: dict[str, int]) -> bytes:
    """A record holding exactly ``fields`` (as :func:`event_fields` returns them)."""
    words = [fields["id"], 0, 0, 0]
    for name, word, _, low in EVENT_FIELDS.get(fields["id"], _HEAD):
        words[word] |= fields.get(name, 0) << low
    return b"".join(w.to_bytes(8, "little") for w in words)


def describe_event(record: bytes) -> str:
    """``NAME field=value ...`` for a record."""
    fields = event_fields(record)
    name = EVENT_NAMES.get(fields.pop("id"), f"{record[0]:#x}")
    return name + " " + " ".join(f"{k}={v:#x}" for k, v in fields.items() if v)


# -- stage-1 table building -----------------------------------------------------------


class TableBuilder:
    """Allocates translation tables from the layout's pool and records descriptor writes."""

    def __init__(self, layout: Layout, granule: Granule, va_bits: int) -> None:
        self.granule = granule
        self.va_bits = va_bits
        self.start_level = granule.start_level(va_bits)
        self._next = _align_up(layout.tables, granule.size)
        self._end = layout.tables_end
        self.root = self._allocate()
        #: (table address, level) of every table, by the VA prefix it covers.
        self._tables: dict[tuple[int, int], int] = {(self.start_level, 0): self.root}
        self.descriptors: dict[int, int] = {}

    def _allocate(self) -> int:
        table = self._next
        self._next += self.granule.size
        if self._next > self._end:
            raise ValueError("scenario needs more translation tables than the pool holds")
        return table

    def _prefix(self, va: int, level: int) -> int:
        return va >> self.granule.level_shift(level - 1) if level > self.start_level else 0

    def table_for(self, va: int, level: int) -> int:
        """The level-``level`` table on ``va``'s walk, creating the path to it."""
        table = self.root
        for current in range(self.start_level, level):
            key = (current + 1, self._prefix(va, current + 1))
            child = self._tables.get(key)
            if child is None:
                child = self._allocate()
                self._tables[key] = child
                self.descriptors[self.slot(table, va, current)] = smmu.table_desc(child)
            table = child
        return table

    def slot(self, table: int, va: int, level: int) -> int:
        """The descriptor address ``va`` uses in ``table`` at ``level``."""
        index = self.granule.index(va, level)
        if level == self.start_level:
            index &= (1 << (self.va_bits - self.granule.level_shift(level))) - 1
        return table + 8 * index

    def map(self, va: int, output: int, level: int, leaf: Leaf) -> int:
        """Map ``va``'s page or block at ``level`` to ``output``; the descriptor's address."""
        address = self.slot(self.table_for(va, level), va, level)
        self.descriptors[address] = smmu.leaf_desc(output, leaf, page=level == 3)
        return address

    def writes(self) -> tuple[tuple[int, bytes], ...]:
        """Every descriptor as a memory write."""
        return tuple((address, value.to_bytes(8, "little"))
                     for address, value in sorted(self.descriptors.items()))


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def linear_cfg(log2size: int) -> int:
    """STRTAB_BASE_CFG for a linear table of 2^log2size STEs."""
    return log2size


def two_level_cfg(log2size: int, split: int) -> int:
    """STRTAB_BASE_CFG for a 2-level table."""
    return smmu.STRTAB_FMT_2LVL | split << smmu.STRTAB_SPLIT_SHIFT | log2size


def ste_writes(layout: Layout, sid: int, entry: bytes, *, split: int | None,
               span: int | None = None) -> tuple[tuple[int, bytes], ...]:
    """The writes placing STE ``entry`` for ``sid`` in a linear table, or in a 2-level one
    (its L1 descriptor with ``span`` (default split + 1) and the L2 table)."""
    if split is None:
        return ((layout.strtab + sid * smmu.STE_BYTES, entry),)
    l1_index = sid >> split
    l2 = layout.l2_strtabs
    chosen = split + 1 if span is None else span
    return ((layout.strtab + 8 * l1_index, smmu.l1_std(l2, chosen)),
            (l2 + (sid & ((1 << split) - 1)) * smmu.STE_BYTES, entry))


def sequence(*parts: Action | Sequence[Action]) -> tuple[Action, ...]:
    """Flatten actions and lists of actions."""
    out: list[Action] = []
    for part in parts:
        if isinstance(part, (list, tuple)):
            out.extend(part)
        else:
            out.append(part)  # type: ignore[arg-type]
    return tuple(out)
