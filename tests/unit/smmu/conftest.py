"""Fixtures for the vSMMUv3 model tests: guest RAM, a recording sink, a probed+reset SMMU."""

from __future__ import annotations

import pytest

from vsmmu.smmu import GuestRam, RecordingConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam(RAM_BASE, RAM_SIZE)


@pytest.fixture
def sink() -> RecordingConfigSink:
    return RecordingConfigSink()


@pytest.fixture
def features() -> SmmuFeatures:
    return SmmuFeatures()


@pytest.fixture
def smmu(ram: GuestRam, sink: RecordingConfigSink, features: SmmuFeatures) -> SmmuV3:
    return SmmuV3(ram, sink, features)


@pytest.fixture
def driver(smmu: SmmuV3, ram: GuestRam, sink: RecordingConfigSink) -> GuestDriver:
    """A driver that has probed and reset the SMMU; the sink's calls are cleared."""
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    sink.calls.clear()
    return drv
