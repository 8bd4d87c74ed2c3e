"""The vSMMUv3 device model: registers, queues, stream table, GERROR, IRQ.

Public API (see :mod:`vsmmu.smmu.interfaces` for the contracts):

* :class:`~vsmmu.smmu.device.SmmuV3` — the device: ``read``/``write`` (MMIO),
  ``reset``, ``lookup_ste``, ``lookup_cd``, ``record_event``,
  ``signal_event_overflow``, ``stream_table``, ``gbpa_state``.
* :class:`~vsmmu.smmu.features.SmmuFeatures` — what is advertised; ID registers.
* :mod:`~vsmmu.smmu.interfaces` — ``GuestMemory``/``GuestRam``/
  ``GuestMemoryError``, ``ConfigSink``/``NullConfigSink``/``RecordingConfigSink``,
  ``QueuedCommand``, ``StreamTableConfig``, ``GbpaState``, ``IrqLine``, ``SmmuError``.
* :mod:`~vsmmu.smmu.streamtable` — ``SteLookup``/``SteStatus``, ``CdLookup``/
  ``CdStatus`` and the STE/CD validity policy.
* :mod:`~vsmmu.smmu.guest_driver` — a Linux-like guest driver for tests.
"""

from vsmmu.smmu.cmdq import BATCHABLE_OPCODES
from vsmmu.smmu.device import SmmuV3
from vsmmu.smmu.features import SmmuFeatures
from vsmmu.smmu.interfaces import (
    ConfigSink,
    GbpaState,
    GuestMemory,
    GuestMemoryError,
    GuestRam,
    IrqLine,
    NullConfigSink,
    QueuedCommand,
    RecordingConfigSink,
    SmmuError,
    StreamTableConfig,
)
from vsmmu.smmu.streamtable import CdLookup, CdStatus, SteLookup, SteStatus

__all__ = [
    "BATCHABLE_OPCODES", "CdLookup", "CdStatus", "ConfigSink", "GbpaState", "GuestMemory",
    "GuestMemoryError", "GuestRam", "IrqLine", "NullConfigSink", "QueuedCommand",
    "RecordingConfigSink", "SmmuError", "SmmuFeatures", "SmmuV3", "SteLookup", "SteStatus",
    "StreamTableConfig",
]
