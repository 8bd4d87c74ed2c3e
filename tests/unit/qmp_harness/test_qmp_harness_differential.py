"""The differential comparison on hand-made observations: what agrees, what a known
difference explains, and what stays a new difference."""

from __future__ import annotations

from qmp_harness.differential.compare import Verdict, judge
from qmp_harness.differential.scenario import Dma, Observation, Scenario, encode_fields
from qmp_harness.differential.smmu import DmaOutcome

TX_FAIL, OK, MISMATCH = 0xDEAD_0002, 0, 0xDEAD_0004
F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION, C_BAD_CD = 0x10, 0x11, 0x12, 0x13, 0x0A
IOVA, GPA = 0x1000, 0x4100_0000


def record(event_id: int, address: int = IOVA) -> bytes:
    return encode_fields({"id": event_id, "sid": 0x10, "class": 2, "input_addr": address})


def observation(results: list[int], groups: list[list[bytes]], window: str = "w") -> Observation:
    dmas, events = [], []
    for result, group in zip(results, groups, strict=True):
        events += group
        dmas.append(DmaOutcome(IOVA, GPA, 16, result, len(events)))
    return Observation(tuple(dmas), tuple(events), window, 0, 0)


def scenario(*dmas: Dma, unprivileged: bool = False) -> Scenario:
    return Scenario("t", tuple(dmas), unprivileged_leaf=unprivileged)


def test_identical_observations_agree() -> None:
    ours = observation([TX_FAIL], [[record(F_TRANSLATION)]])
    assert judge(scenario(Dma(IOVA, GPA, 16)), ours, ours).verdict is Verdict.AGREED


def test_records_of_one_split_dma_are_coalesced() -> None:
    ours = observation([TX_FAIL], [[record(F_TRANSLATION)]])
    qemu = observation([TX_FAIL], [[record(F_TRANSLATION, IOVA + a) for a in (0, 4, 8, 12)]])
    outcome = judge(scenario(Dma(IOVA, GPA, 16)), ours, qemu)
    assert outcome.verdict is Verdict.KNOWN and outcome.known is not None
    assert outcome.known.key == "qemu-splits-dma"
    # A record outside the DMA is not part of the split: a real difference.
    qemu = observation([TX_FAIL], [[record(F_TRANSLATION), record(F_TRANSLATION, IOVA + 64)]])
    assert judge(scenario(Dma(IOVA, GPA, 16)), ours, qemu).verdict is Verdict.NEW


def test_address_size_before_permission_is_known_but_other_swaps_are_not() -> None:
    ours = observation([TX_FAIL], [[record(F_ADDR_SIZE)]])
    qemu = observation([TX_FAIL], [[record(F_PERMISSION)]])
    outcome = judge(scenario(Dma(IOVA, GPA, 16)), ours, qemu)
    assert outcome.known is not None and outcome.known.key == "qemu-addr-size-after-permission"
    swapped = judge(scenario(Dma(IOVA, GPA, 16)), qemu, ours)
    assert swapped.verdict is Verdict.NEW
    # Access flag before Permission is what both SMMUs do: never a known difference.
    access = observation([TX_FAIL], [[record(F_ACCESS)]])
    assert judge(scenario(Dma(IOVA, GPA, 16)), access, qemu).verdict is Verdict.NEW
    other = observation([TX_FAIL], [[record(C_BAD_CD)]])
    assert judge(scenario(Dma(IOVA, GPA, 16)), ours, other).verdict is Verdict.NEW


def test_stale_translation_allowed_only_where_marked() -> None:
    ours = observation([OK, OK], [[], []], window="a")
    qemu = observation([OK, MISMATCH], [[], []], window="b")
    marked = scenario(Dma(IOVA, GPA, 16), Dma(IOVA, GPA, 16, may_be_stale=True))
    assert judge(marked, ours, qemu).verdict is Verdict.KNOWN
    unmarked = scenario(Dma(IOVA, GPA, 16), Dma(IOVA, GPA, 16))
    assert judge(unmarked, ours, qemu).verdict is Verdict.NEW


def test_privilege_rule_needs_a_privileged_leaf() -> None:
    ours = observation([TX_FAIL], [[record(F_PERMISSION)]], window="a")
    qemu = observation([OK], [[]], window="b")
    assert judge(scenario(Dma(IOVA, GPA, 16), unprivileged=True), ours, qemu).verdict \
        is Verdict.KNOWN
    assert judge(scenario(Dma(IOVA, GPA, 16)), ours, qemu).verdict is Verdict.NEW


def test_readme_table_is_the_code_table() -> None:
    from pathlib import Path

    from qmp_harness.differential.compare import known_differences_table
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert known_differences_table() in readme
