"""The ioctl sequence drawer and its comparison (the kernel side runs in the host lane)."""

from __future__ import annotations

import copy

from qmp_harness.iommufd_diff import differences, run, sequence


def test_a_seed_draws_the_same_sequence_every_time() -> None:
    assert sequence(3, 5, 50) == sequence(3, 5, 50)
    assert sequence(3, 5, 50) != sequence(3, 6, 50)


def test_the_sim_builds_the_prologue_and_the_record_repeats() -> None:
    first = list(run("sim", 11, 3, 30))
    assert first == list(run("sim", 11, 3, 30))
    # The prologue's six objects are made with ids 3..7 after the two devices.
    prologue = first[0][:6]
    assert [o["errno"] for o in prologue] == [0] * 6
    assert prologue[0]["out"]["out_ioas_id"] == 3
    veventq = prologue[5]["out"]
    assert (veventq["out_veventq_id"], veventq["out_veventq_fd"]) == (7, "fd")


def test_a_changed_outcome_is_reported_at_its_op() -> None:
    record = list(run("sim", 11, 2, 30))
    changed = copy.deepcopy(record)
    changed[1][9] = {"errno": "EPERM"}
    found = differences(11, 30, record, changed)
    assert len(found) == 1 and found[0].startswith("sequence 1 op 9: ")
    assert "kernel: {'errno': 'EPERM'}" in found[0]
    assert differences(11, 30, record, copy.deepcopy(record)) == []
