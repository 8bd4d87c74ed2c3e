"""Run scenarios on both targets, compare, and sort every difference.

Two observations agree when every DMA's RESULT, the output window's bytes,
GERROR, CMDQ_CONS.ERR and every event record (id and each architecturally
defined field, IHI 0070 §7.3) are equal.  A difference is *known* when a
rule of :data:`KNOWN_DIFFERENCES` explains it — each rule names the IHI 0070
section that decides it and says whether QEMU or the architecture's
freedom is the cause; anything else is *new* and fails the run.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence

from qmp_harness.differential.scenario import Dma, Observation, Scenario, event_fields, run
from qmp_harness.differential.smmu import DmaOutcome
from qmp_harness.differential.targets import Target
from qmp_harness.qtest import QtestError

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    """How one scenario came out."""

    AGREED = "agreed"
    KNOWN = "known difference"
    NEW = "new difference"
    ONE_TARGET = "one target only"


def coalesce(observation: Observation) -> tuple[dict[str, int], ...]:
    """Each record's fields; within the records one DMA left, those equal but for a rising
    input address inside the DMA (one DMA split into several accesses, each faulting on its
    own) are kept once, as their first."""
    out: list[dict[str, int]] = []
    start = 0
    groups: list[tuple[int, DmaOutcome | None]] = [(d.events_after, d) for d in observation.dmas]
    groups.append((len(observation.events), None))
    for end, dma in groups:
        out.extend(_coalesce_group(observation.events[start:max(start, end)], dma))
        start = max(start, end)
    return tuple(out)


def _coalesce_group(records: Sequence[bytes], dma: DmaOutcome | None) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    seen: list[dict[str, int]] = []
    for record in records:
        fields = event_fields(record)
        address = fields.get("input_addr")
        key = {k: v for k, v in fields.items() if k != "input_addr"}
        inside = dma is not None and (address is None
                                      or dma.iova <= address < dma.iova + dma.length)
        if inside and key in seen:
            continue
        seen.append(key)
        out.append(fields)
    return out


def normalized(observation: Observation) -> Observation:
    """``observation`` with split-DMA records coalesced (see :func:`coalesce`)."""
    from qmp_harness.differential.scenario import encode_fields
    events = tuple(encode_fields(f) for f in coalesce(observation))
    return dataclasses.replace(observation, events=events)


F_WALK_EABT, F_CD_FETCH, C_BAD_STE = 0x0B, 0x09, 0x04
F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION = 0x10, 0x11, 0x12, 0x13
TX_FAIL = 0xDEAD_0002


@dataclasses.dataclass(frozen=True)
class Step:
    """One DMA as both targets performed it, with the records it left (coalesced)."""

    dma: Dma
    ours: DmaOutcome
    qemu: DmaOutcome
    ours_events: tuple[dict[str, int], ...]
    qemu_events: tuple[dict[str, int], ...]

    @property
    def differs(self) -> bool:
        """The results or the records differ."""
        return self.ours != self.qemu or self.ours_events != self.qemu_events

    def ids(self) -> tuple[list[int], list[int]]:
        """The event ids each target recorded."""
        return [e["id"] for e in self.ours_events], [e["id"] for e in self.qemu_events]

    def same_but_id(self) -> bool:
        """One record each, equal in every field but the id; same DMA result."""
        if len(self.ours_events) != 1 or len(self.qemu_events) != 1:
            return False
        mine, theirs = dict(self.ours_events[0]), dict(self.qemu_events[0])
        mine.pop("id")
        theirs.pop("id")
        return mine == theirs and self.ours == self.qemu


def grouped(observation: Observation) -> list[tuple[dict[str, int], ...]]:
    """The coalesced records after each DMA (see :func:`coalesce`), then those after the
    last DMA."""
    records = coalesce(observation)
    counts = _group_sizes(observation)
    groups = []
    start = 0
    for size in counts:
        groups.append(tuple(records[start:start + size]))
        start += size
    return groups


def _group_sizes(observation: Observation) -> list[int]:
    sizes = []
    start = 0
    bounds = [d.events_after for d in observation.dmas] + [len(observation.events)]
    for index, end in enumerate(bounds):
        dma = observation.dmas[index] if index < len(observation.dmas) else None
        sizes.append(len(_coalesce_group(observation.events[start:max(start, end)], dma)))
        start = max(start, end)
    return sizes


def steps(scenario: Scenario, ours: Observation, qemu: Observation) -> list[Step] | None:
    """The DMAs side by side; None when the records after the last DMA differ."""
    dmas = [a for a in scenario.actions if isinstance(a, Dma)]
    mine, theirs = grouped(ours), grouped(qemu)
    if mine[-1] != theirs[-1]:
        return None
    return [Step(d, a, b, ea, eb) for d, a, b, ea, eb in zip(
        dmas, ours.dmas, qemu.dmas, mine[:-1], theirs[:-1], strict=True)]


StepRule = Callable[[Scenario, Step], bool]


def _stale(scenario: Scenario, step: Step) -> bool:
    return step.dma.may_be_stale


def _addr_size_before_access_permission(scenario: Scenario, step: Step) -> bool:
    mine, theirs = step.ids()
    return (step.same_but_id() and mine == [F_ADDR_SIZE]
            and theirs in ([F_ACCESS], [F_PERMISSION]))


def _ignores_privilege(scenario: Scenario, step: Step) -> bool:
    return (scenario.unprivileged_leaf and step.ours.result == TX_FAIL
            and step.ids() == ([F_PERMISSION], []))


def _s1cdmax(scenario: Scenario, step: Step) -> bool:
    mine, theirs = step.ids()
    return scenario.kind == "config-ste-s1cdmax" and not mine and set(theirs) == {C_BAD_STE}


def _fetch_abort_not_reported(scenario: Scenario, step: Step) -> bool:
    mine, theirs = step.ids()
    return (step.ours == step.qemu and step.ours.result == TX_FAIL and not mine
            and bool(theirs) and set(theirs) <= {F_WALK_EABT, F_CD_FETCH})


def _reserved_block_unrecorded(scenario: Scenario, step: Step) -> bool:
    return (scenario.name.endswith("-reserved-block") and step.ours.result == TX_FAIL
            and step.ids() == ([F_TRANSLATION], []))


def _table_address_size(scenario: Scenario, step: Step) -> bool:
    return step.ids() == ([F_ADDR_SIZE], [F_WALK_EABT]) and step.ours == step.qemu


@dataclasses.dataclass(frozen=True)
class KnownDifference:
    """A documented way the two SMMUs may differ (README, "Known differences").

    ``explains`` is asked about each DMA whose outcome differs; the rule applies when it
    explains every one of them (and nothing else differs, but the output window when
    ``window_may_differ``).
    """

    key: str
    summary: str
    #: The IHI 0070 section that decides it, and who is right.
    ruling: str
    explains: StepRule
    #: The scenarios (name prefix and kind) that show it.
    shown_by: str = ""
    window_may_differ: bool = False


KNOWN_DIFFERENCES: tuple[KnownDifference, ...] = (
    KnownDifference(
        "stale-tlb",
        "After a leaf changed with no (or a non-matching) TLBI, one SMMU used the cached "
        "translation and the other walked again.",
        "IHI 0070 §16.2 (caching): an SMMU may cache a translation until it is invalidated, "
        "and need not; both outcomes are correct. Only DMAs marked may_be_stale may differ.",
        _stale, "stale/…-tlbi{none,other-asid}: leaf changed, DMA before the TLBI",
        window_may_differ=True),
    KnownDifference(
        "qemu-addr-size-after-permission",
        "A leaf whose output address is beyond the CD's effective IPS, and read-only or AF=0: "
        "QEMU records F_PERMISSION/F_ACCESS, we record F_ADDR_SIZE.",
        "IHI 0070 §3.4 and §5.4 IPS: the output address is range-checked as part of the walk "
        "(F_ADDR_SIZE); the Access flag and then permissions are checked on the walk's result "
        "(Arm ARM fault prioritisation; §3.13.1 puts Access before Permission, as both SMMUs "
        "do). QEMU checks the output address last.",
        _addr_size_before_access_permission,
        "walk-fault/…-ap{2,3}-…-output-beyond-ips, walk-fault/…af0-…-output-beyond-ips"),
    KnownDifference(
        "qemu-s1cdmax",
        "STE.S1CDMax != 0 on SMMUs that advertise IDR1.SSIDSIZE=0 (both do): QEMU records "
        "C_BAD_STE, we translate through the one CD at S1ContextPtr.",
        "IHI 0070 §5.2 S1CDMax: 'If SMMU_IDR1.SSIDSIZE == 0, this field is IGNORED' (and "
        "S1Fmt, S1DSS with it). QEMU rejects any S1CDMax != 0 (multiple CDs unsupported).",
        _s1cdmax, "config/ste-s1cdmax", window_may_differ=True),
    KnownDifference(
        "qemu-ignores-privilege",
        "A write to a leaf with AP[1]=0 (EL0 no access): QEMU lets the device write, we "
        "record F_PERMISSION.",
        "IHI 0070 §13.7: a transaction without a PASID TLP prefix is 'Unprivileged' (STE.PRIVCFG "
        "0b00 uses it); stage-1 AP[2:1]=0b0x gives unprivileged accesses no access. QEMU "
        "ignores AP[1].",
        _ignores_privilege, "translate/…-ap0af1… (AP[2:1]=0b00: RW, EL1 only)",
        window_may_differ=True),
    KnownDifference(
        "nested-fetch-abort",
        "A CD or stage-1 table at an address with nothing behind it (outside guest RAM): QEMU "
        "records F_CD_FETCH / F_WALK_EABT, we abort the DMA with no record.",
        "Deliberate (nesting): our CD fetches and table walks are the host SMMU's, through "
        "stage 2 (the IOAS holding guest RAM); a fetch outside it is a stage-2 fault with "
        "CLASS=CD/TT (IHI 0070 §7.3.12), which the host owns and the kernel does not forward "
        "into the vEVENTQ, so the guest sees the abort but no record.",
        _fetch_abort_not_reported,
        "config/cd-unbacked, config/cd-ttb0-unbacked, walk-fault/…-table-unbacked"),
    KnownDifference(
        "qemu-table-address-size",
        "A table descriptor pointing beyond the CD's effective IPS: QEMU fetches it "
        "(F_WALK_EABT), we record F_ADDR_SIZE.",
        "IHI 0070 §5.4 IPS: 'This check applies to stage 1 next-level table addresses in Table "
        "descriptors'. QEMU checks only output addresses.",
        _table_address_size, "walk-fault/…-table-beyond-ips"),
    KnownDifference(
        "qemu-reserved-block",
        "A block descriptor where the granule allows none (level 0 for 4K, level 1 for 64K): "
        "we abort the DMA with F_TRANSLATION; QEMU aborts it with no record, or (64K level 1) "
        "takes it as a 4 TiB block and writes there.",
        "IHI 0070 §3.4/§5.4 defer descriptor formats to the Arm ARM VMSAv8-64, where such a "
        "descriptor is invalid and gives a Translation fault; F_TRANSLATION is recorded when "
        "CD.R=1 (§5.5). QEMU bug.",
        _reserved_block_unrecorded, "walk-fault/…-reserved-block", window_may_differ=True),
)


#: What :func:`judge` reports when only QEMU's split records differ.
SPLIT_DMA = KnownDifference(
    "qemu-splits-dma",
    "QEMU's iommu-testdev DMA reaches QEMU's SMMU as several aligned accesses, each "
    "translated and faulting on its own, so one failed DMA leaves several records "
    "(input addresses rising inside the DMA); ours is one transaction with one record.",
    "Not an SMMU difference: IHI 0070 §7.3 records one event per faulting transaction, and "
    "the number of transactions is the device's and the interconnect's choice. Compared "
    "with each run of such records taken as its first.",
    lambda scenario, step: True, "any failed DMA longer than 4 bytes or unaligned")


def known_differences_table() -> str:
    """The README's known-differences table (markdown), from :data:`KNOWN_DIFFERENCES`."""
    rows = ["| key | what differs | ruling | shown by |", "|---|---|---|---|"]
    for known in (SPLIT_DMA, *KNOWN_DIFFERENCES):
        rows.append(f"| `{known.key}` | {known.summary} | {known.ruling} | {known.shown_by} |")
    return "\n".join(rows)


@dataclasses.dataclass
class Outcome:
    """One scenario's verdict and, on a difference, the two observations."""

    scenario: Scenario
    verdict: Verdict
    ours: Observation | None = None
    qemu: Observation | None = None
    known: KnownDifference | None = None
    #: A target failed during the scenario: what it and QEMU logged.
    crash: str | None = None

    def report(self) -> str:
        """The scenario and both observations, readable."""
        lines = [f"{self.verdict.value}: {self.scenario.name}"]
        if self.known is not None:
            lines.append(f"  known: {self.known.key} — {self.known.ruling}")
        if self.scenario.only:
            lines.append(f"  runs on {self.scenario.only} only: {self.scenario.only_reason}")
        if self.crash is not None:
            lines.append(f"  target failed:\n{self.crash}")
        for label, observation in (("vsmmu", self.ours), ("qemu", self.qemu)):
            if observation is not None:
                lines += [f"  {label}: {line}" for line in observation.describe()]
        return "\n".join(lines)


def judge(scenario: Scenario, ours: Observation, qemu: Observation) -> Outcome:
    """Compare the two observations (module docstring)."""
    if _same(ours, qemu):
        return Outcome(scenario, Verdict.AGREED, ours, qemu)
    plain_ours, plain_qemu = normalized(ours), normalized(qemu)
    if _same(plain_ours, plain_qemu):
        return Outcome(scenario, Verdict.KNOWN, ours, qemu, SPLIT_DMA)
    known = explain(scenario, ours, qemu)
    if known is not None:
        return Outcome(scenario, Verdict.KNOWN, ours, qemu, known)
    return Outcome(scenario, Verdict.NEW, ours, qemu)


def explain(scenario: Scenario, ours: Observation, qemu: Observation) -> KnownDifference | None:
    """The known difference that explains every differing DMA, if one does."""
    if ours.gerror != qemu.gerror or ours.cmdq_error != qemu.cmdq_error:
        return None
    side_by_side = steps(scenario, ours, qemu)
    if side_by_side is None:
        return None
    differing = [step for step in side_by_side if step.differs]
    for known in KNOWN_DIFFERENCES:
        if (differing and all(known.explains(scenario, step) for step in differing)
                and (known.window_may_differ or ours.window_digest == qemu.window_digest)):
            return known
    return None


def _same(ours: Observation, qemu: Observation) -> bool:
    return (ours.dmas == qemu.dmas and ours.window_digest == qemu.window_digest
            and ours.gerror == qemu.gerror and ours.cmdq_error == qemu.cmdq_error
            and [event_fields(e) for e in ours.events] == [event_fields(e) for e in qemu.events])


async def compare(scenario: Scenario, ours: Target, qemu: Target) -> Outcome:
    """Run ``scenario`` on both targets (only on one when it says so) and judge.

    A target that stops answering (QEMU or the service died) makes the scenario a new
    difference carrying the target's logs; the target is restarted for the next one.
    """
    observations: dict[str, Observation] = {}
    for target in (ours, qemu):
        if scenario.only not in (None, target.name):
            continue
        try:
            observations[target.name] = await run(scenario, target)
        except (QtestError, OSError, EOFError) as exc:
            report = target.failure_report(f"{scenario.name}: {exc}")
            log.error("%s", report)
            await target.restart()
            return Outcome(scenario, Verdict.NEW, crash=report)
    if scenario.only is not None:
        return Outcome(scenario, Verdict.ONE_TARGET, ours=observations.get(ours.name),
                       qemu=observations.get(qemu.name))
    return judge(scenario, observations[ours.name], observations[qemu.name])


@dataclasses.dataclass
class Summary:
    """Counts over a run, and every outcome that was not plain agreement."""

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        self.outcomes.append(outcome)

    def count(self, verdict: Verdict) -> int:
        """Outcomes with ``verdict``."""
        return sum(1 for o in self.outcomes if o.verdict is verdict)

    def by_kind(self) -> dict[str, int]:
        """Scenarios per kind."""
        kinds: dict[str, int] = {}
        for outcome in self.outcomes:
            kinds[outcome.scenario.kind] = kinds.get(outcome.scenario.kind, 0) + 1
        return dict(sorted(kinds.items()))

    def event_ids(self) -> dict[str, int]:
        """How many scenarios produced each event id (on either target)."""
        from qmp_harness.differential.scenario import EVENT_NAMES
        seen: dict[str, int] = {}
        for outcome in self.outcomes:
            ids = set()
            for observation in (outcome.ours, outcome.qemu):
                if observation is not None:
                    ids |= {e[0] for e in observation.events}
            for event_id in ids:
                name = EVENT_NAMES.get(event_id, hex(event_id))
                seen[name] = seen.get(name, 0) + 1
        return dict(sorted(seen.items()))

    def text(self, *, details: bool = True) -> str:
        """The printed summary."""
        lines = [f"scenarios run: {len(self.outcomes)}",
                 f"agreed: {self.count(Verdict.AGREED)}",
                 f"known differences: {self.count(Verdict.KNOWN)}",
                 f"new differences: {self.count(Verdict.NEW)}",
                 f"one target only: {self.count(Verdict.ONE_TARGET)}"]
        known: dict[str, int] = {}
        for outcome in self.outcomes:
            if outcome.known is not None:
                known[outcome.known.key] = known.get(outcome.known.key, 0) + 1
        lines += [f"  known {key}: {n}" for key, n in sorted(known.items())]
        lines.append("by kind: " + ", ".join(f"{k}={n}" for k, n in self.by_kind().items()))
        lines.append("events seen: " + ", ".join(f"{k}={n}" for k, n in self.event_ids().items()))
        only: dict[tuple[str | None, str, str], int] = {}
        for outcome in self.outcomes:
            if outcome.verdict is Verdict.ONE_TARGET:
                key = (outcome.scenario.only, outcome.scenario.name, outcome.scenario.only_reason)
                only[key] = only.get(key, 0) + 1
        for (target, name, reason), count in only.items():
            lines.append(f"only on {target}: {name} x{count} ({reason})")
        if details:
            lines += [o.report() for o in self.outcomes if o.verdict is Verdict.NEW]
        return "\n".join(lines)


async def run_all(scenarios: Sequence[Scenario], ours: Target, qemu: Target,
                  progress: Callable[[int, Outcome], None] | None = None) -> Summary:
    """Compare every scenario."""
    summary = Summary()
    for index, scenario in enumerate(scenarios):
        outcome = await compare(scenario, ours, qemu)
        summary.add(outcome)
        if progress is not None:
            progress(index, outcome)
    return summary
