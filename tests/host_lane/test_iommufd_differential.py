"""Random iommufd ioctl sequences on the real kernel and on the sim: the same outcomes.

:mod:`qmp_harness.iommufd_diff` draws the sequences from a seed; L1 runs them on
``/dev/iommu`` with two ``iommu-testdev`` functions bound to ``vfio-pci`` and
prints the record, which must equal the sim's record of the same seed, op by
op (errno, the structure as the ioctl left it, what it wrote through its
pointers).  The kernel is the reference: a difference is a sim bug.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from qmp_harness.host_lane import HostLane, LaneConfig
from qmp_harness.iommufd_diff import differences, run

pytestmark = pytest.mark.host_lane

SEED = 7
SEQUENCES = 200
OPS = 100
SHOWN = 10


def test_random_ioctl_sequences_have_the_kernels_outcomes_on_the_sim(
        capsys: pytest.CaptureFixture[str]) -> None:
    lane = HostLane.provision()
    command = ["python3", "-m", "qmp_harness.iommufd_diff", "--backend", "kernel", "--seed",
               str(SEED), "--sequences", str(SEQUENCES), "--ops", str(OPS)]
    result = asyncio.run(lane.run(command, LaneConfig(testdevs=2)))
    assert result.status == 0, f"the kernel run failed:\n{result.output[-4000:]}"
    records = [line for line in result.output.splitlines() if line.startswith("[[")]
    assert records, f"no record in the lane's output:\n{result.output[-4000:]}"
    kernel = json.loads(records[-1])
    sim = list(run("sim", SEED, SEQUENCES, OPS))
    found = differences(SEED, OPS, sim, kernel)
    ioctls = sum(map(len, kernel))
    with capsys.disabled():  # shown in make test's output, not captured
        print(f"\niommufd differential: {ioctls} ioctls in {SEQUENCES} sequences, "
              f"{len(found)} sequence(s) where the sim differs from the kernel")
    assert not found, "\n".join(found[:SHOWN])
