"""The device model's observer hook: what a checker (the sanitizer) hears from :class:`SmmuV3`.

The model holds at most one observer (``SmmuV3.observer``, None by default)
and calls it only at the end of a command-queue consume, when an event
record is lost to a full queue and on a device reset, so the hook costs one attribute test per
CMDQ_PROD write when nobody listens, and nothing per command.
"""

from __future__ import annotations

import abc


class SmmuObserver(abc.ABC):
    """Hears the guest's command stream and lost events; must never raise into the model."""

    @abc.abstractmethod
    def commands_consumed(self, first: int, end: int) -> None:
        """Commands at CMDQ pointers ``first`` up to (not including) ``end`` were executed.

        Called once per consume, after the last command took effect and before
        any CMD_SYNC's MSI is written (Linux points it at the SYNC's own slot):
        the commands are still in guest memory at their queue slots.
        """

    @abc.abstractmethod
    def event_queue_full(self, record: bytes) -> None:
        """``record`` was lost: the guest's event queue was full."""

    @abc.abstractmethod
    def reset(self) -> None:
        """The device was reset: whatever the guest configured before is gone."""
