"""The conformance suite's kernel cases, run on the real iommufd kernel in the host lane.

Boots L1 (README, "The host lane") with three ``iommu-testdev`` functions
bound to ``vfio-pci`` and runs tests/unit/iommufd/test_iommufd_conformance.py
there with ``-k kernel``: every case talks to /dev/iommu and the VFIO cdevs.
Any failure, error or skip there fails this test; the number of cases that
ran on the kernel is printed.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from qmp_harness.host_lane import HostLane, LaneConfig

pytestmark = pytest.mark.host_lane

SUITE = "/lane/project/tests/unit/iommufd/test_iommufd_conformance.py"
TESTDEVS = 3
MIN_KERNEL_CASES = 150
OUTCOMES = ("passed", "failed", "skipped", "error", "errors", "deselected", "xfailed", "xpassed")


def summary(output: str) -> dict[str, int]:
    """Counts from pytest's final ``N passed, M failed ...`` line."""
    counts = dict.fromkeys(OUTCOMES, 0)
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        return counts
    for number, outcome in re.findall(r"(\d+) (\w+)", lines[-1]):
        if outcome in counts:
            counts[outcome] = int(number)
    return counts


def test_summary_reads_pytest_counts() -> None:
    line = "== 3 failed, 150 passed, 2 skipped, 374 deselected, 1 error in 40.1s =="
    counts = summary(f"noise\n{line}\n")
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["error"]) == (150, 3,
                                                                                       2, 1)


def test_conformance_cases_pass_on_the_real_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    lane = HostLane.provision()
    command = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel",
               "-rfEs", "--rootdir", "/lane/project", SUITE]
    result = asyncio.run(lane.run(command, LaneConfig(testdevs=TESTDEVS)))
    counts = summary(result.output)
    with capsys.disabled():  # shown in make test's output, not captured
        print(f"\nconformance cases run on the real kernel: {counts['passed']} passed, "
              f"{counts['failed']} failed, {counts['skipped']} skipped (L1 /init after "
              f"{result.init_seconds:.0f}s, {result.wall_seconds:.0f}s in all)")
    tail = "\n".join(result.output.splitlines()[-60:])
    assert result.status == 0, f"pytest in L1 exited {result.status}:\n{tail}"
    assert counts["failed"] == counts["error"] == counts["errors"] == counts["skipped"] == 0, tail
    assert counts["passed"] >= MIN_KERNEL_CASES, tail
