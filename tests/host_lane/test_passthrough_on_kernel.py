"""The passthrough scenarios on the real kernel: boot the host lane, run them in L1.

L1 has a nesting SMMUv3 (QEMU's, CANWBS through the upgraded IORT), a real
iommufd kernel and a real ``iommu-testdev`` bound to ``vfio-pci``; inside it
``tests/passthrough/test_passthrough_scenarios.py`` runs its ``kernel`` world: ``vsmmu serve
--backend kernel --endpoint vfio=<cdev>`` with our client as QEMU and
GuestDriver as the guest.  The same file runs its ``sim`` world here.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from qmp_harness.host_lane import HostLane, LaneConfig

pytestmark = pytest.mark.host_lane

SCENARIOS = "tests/passthrough/test_passthrough_scenarios.py"
LANE_PROJECT = "/lane/project"
EXPECTED = (
    "test_dma_lands_at_the_gpa_the_guest_stage1_names",
    "test_unmapped_page_faults_with_the_guest_sid_through_the_veventq",
    "test_host_refused_vste_is_reported_per_the_cbadste_event_policy",
    "test_host_refused_vste_is_cerror_ill_with_the_qemu_accel_policy",
    "test_refused_invalidation_is_cerror_ill_at_its_index",
    "test_commands_before_a_refused_one_have_taken_effect",
    "test_disable_reset_and_disconnect_leave_no_guest_object",
)


async def test_passthrough_scenarios_pass_on_the_real_kernel(
        capsys: pytest.CaptureFixture[str]) -> None:
    lane = await asyncio.to_thread(HostLane.provision)
    # No hypothesis plugin: the lane carries pure-Python files, and hypothesis's plugin
    # imports its native part at start-up (these scenarios do not use it).
    command = ["python3", "-m", "pytest", "-v", "--color=no", "-p", "no:cacheprovider", "-p",
               "no:hypothesispytest", "--rootdir", LANE_PROJECT, f"{LANE_PROJECT}/{SCENARIOS}"]
    result = await lane.run(command, LaneConfig(testdevs=1))
    # The console transcript: the firmware's screen codes can share a line with the lane's
    # start marker, which then does not split the command's output off.
    passed = set(re.findall(r"::(test_\w+)\[kernel\] PASSED", result.console))
    assert result.status == 0 and passed == set(EXPECTED), (
        f"status {result.status}, passed {sorted(passed)}\n{result.console[-8000:]}")
    with capsys.disabled():  # shown in make test's output, not captured
        print(f"\nhost lane: {len(passed)} scenarios passed on the real kernel; /init after "
              f"{result.init_seconds:.1f} s, {result.wall_seconds:.1f} s in all")
