"""The host lane: a real iommufd kernel under QEMU's nesting SMMUv3 (README, "The host lane")."""

from qmp_harness.host_lane.lane import HostLane, LaneConfig, LaneError, LaneResult

__all__ = ["HostLane", "LaneConfig", "LaneError", "LaneResult"]
