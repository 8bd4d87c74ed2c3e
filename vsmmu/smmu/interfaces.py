"""The narrow interfaces between the vSMMUv3 model and the rest of vsmmu.

The model (:class:`vsmmu.smmu.device.SmmuV3`) stands alone: it reads and
writes guest RAM through a :class:`GuestMemory`, tells a :class:`ConfigSink`
what the guest configured and invalidated, and drives an :class:`IrqLine`.
Nothing here knows about vfio-user, iommufd or QEMU.

GuestMemory
    ``read(gpa, size) -> bytes`` and ``write(gpa, data)``.  Both raise
    :class:`GuestMemoryError` (and only that) when any byte is outside guest
    RAM.  The model never lets that error escape: a failed command fetch is
    CERROR_ABT, a failed event write is GERROR.EVENTQ_ABT_ERR, a failed STE
    or CD fetch is an F_STE_FETCH / F_CD_FETCH classification.
    :class:`GuestRam` is the bytearray-backed implementation for tests.

ConfigSink
    Receives, synchronously and in guest order:

    * ``smmu_enable_changed(enabled, stream_table)`` — CR0.SMMUEN changed;
      ``stream_table`` is the STRTAB_BASE/STRTAB_BASE_CFG then in force.
    * ``gbpa_changed(gbpa)`` — a GBPA write with UPDATE=1 completed.
    * ``ste_changed(first_sid, last_sid) -> bool`` — CMD_CFGI_STE,
      CMD_CFGI_STE_RANGE or CMD_CFGI_ALL (SIDs clamped to IDR1.SIDSIZE).
      Returning ``False`` makes the model stop the command queue at that
      command with CERROR_ILL (QEMU's accelerated-SMMUv3 policy for an STE
      the host rejects).
    * ``invalidate(batch) -> int`` — a batch of consecutive invalidation
      commands (CFGI_CD, CFGI_CD_ALL, TLBI_NH_ALL/ASID/VA/VAA, TLBI_NSNH_ALL,
      ATC_INV) as raw :class:`QueuedCommand` s, delivered when a
      non-batchable command (CFGI_STE*, SYNC, ...) or the end of the
      available commands is reached.  Returns how many, from the start, were
      handled; ``k < len(batch)`` stops the queue at ``batch[k]`` with
      CERROR_ILL (CMDQ_CONS points at it).
    * ``sync()`` — a CMD_SYNC was reached (after the preceding batch).
    * ``reset()`` — the device was reset (:meth:`SmmuV3.reset`).

    :class:`NullConfigSink` accepts everything; :class:`RecordingConfigSink`
    records every call as a tuple for tests and can be told to fail.

IrqLine
    The combined wired interrupt (EVTQ + GERROR; no MSI).  Level-sensitive:
    the model calls ``set_level(True/False)``; the line calls its listener
    only on a change.

Translator entry points (on :class:`~vsmmu.smmu.device.SmmuV3`)
    ``lookup_ste(sid) -> SteLookup``, ``lookup_cd(ste, ssid) -> CdLookup``,
    ``record_event(event) -> bool``, ``signal_event_overflow()``.

MMIO entry points (on :class:`~vsmmu.smmu.device.SmmuV3`)
    ``read(offset, size) -> int`` and ``write(offset, size, value)`` over
    the 128 KiB register space, 4- and 8-byte accesses.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from vsmmu.arch.commands import CmdOpcode, Command, decode_command_words

logger = logging.getLogger(__name__)


class SmmuError(Exception):
    """Base of the device-model layer's errors (never raised for guest-controlled data)."""


class GuestMemoryError(SmmuError):
    """A guest-physical access fell (partly) outside guest RAM."""

    def __init__(self, gpa: int, size: int, reason: str) -> None:
        super().__init__(f"guest memory access of {size} bytes at GPA {gpa:#x}: {reason}")
        self.gpa = gpa
        self.size = size


class GuestMemory(Protocol):
    """Guest-physical memory as the SMMU sees it (coherent, little-endian)."""

    def read(self, gpa: int, size: int) -> bytes:
        """Return ``size`` bytes at ``gpa``. Raises GuestMemoryError if outside RAM."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``. Raises GuestMemoryError if outside RAM."""
        ...


class GuestRam:
    """Guest RAM of ``size`` bytes starting at GPA ``base``, in anonymous memory.

    Page-aligned like a VMM's guest RAM (an mmap), so an IOAS with a domain
    accepts it: the kernel refuses a mapping whose user address starts mid-page
    once the IOAS has a domain (``iopt_insert_area``), and the sim with it.
    """

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.data = mmap.mmap(-1, size)

    def _offset(self, gpa: int, size: int) -> int:
        offset = gpa - self.base
        if size < 0 or offset < 0 or offset + size > self.size:
            raise GuestMemoryError(
                gpa, size, f"outside RAM [{self.base:#x}, {self.base + self.size:#x})")
        return offset

    def read(self, gpa: int, size: int) -> bytes:
        """Return ``size`` bytes at ``gpa``. Raises GuestMemoryError if outside RAM."""
        offset = self._offset(gpa, size)
        return bytes(self.data[offset:offset + size])

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``. Raises GuestMemoryError if outside RAM."""
        offset = self._offset(gpa, len(data))
        self.data[offset:offset + len(data)] = data


class QueuedCommand(NamedTuple):
    """A command as it sat in the guest's queue: opcode and the two raw double words.

    The raw words are exactly what iommufd's ARM SMMUv3 invalidation entry
    carries; :meth:`decode` gives the fields by name.
    """

    opcode: CmdOpcode
    dw0: int
    dw1: int

    def decode(self) -> Command:
        """Every field of the command by name."""
        return decode_command_words(self.dw0, self.dw1)

    def __str__(self) -> str:
        return str(self.decode())


@dataclasses.dataclass(frozen=True)
class StreamTableConfig:
    """STRTAB_BASE and STRTAB_BASE_CFG, decoded (LOG2SIZE already clamped to SIDSIZE)."""

    base: int
    fmt: int
    log2size: int
    split: int


@dataclasses.dataclass(frozen=True)
class GbpaState:
    """The global bypass attributes in force (GBPA without UPDATE)."""

    abort: bool
    raw: int


class ConfigSink(Protocol):
    """Receives the guest's configuration changes and invalidations (see module doc)."""

    def smmu_enable_changed(self, enabled: bool, stream_table: StreamTableConfig) -> None:
        """CR0.SMMUEN changed to ``enabled``."""
        ...

    def gbpa_changed(self, gbpa: GbpaState) -> None:
        """A GBPA update completed."""
        ...

    def ste_changed(self, first_sid: int, last_sid: int) -> bool:
        """STEs ``first_sid..last_sid`` (inclusive) may have changed; False = reject (ILL)."""
        ...

    def invalidate(self, batch: Sequence[QueuedCommand]) -> int:
        """Handle invalidation commands in order; return how many succeeded."""
        ...

    def sync(self) -> None:
        """A CMD_SYNC was consumed."""
        ...

    def reset(self) -> None:
        """The device was reset."""
        ...


class NullConfigSink:
    """A sink that accepts everything and does nothing."""

    def smmu_enable_changed(self, enabled: bool, stream_table: StreamTableConfig) -> None:
        """Ignore."""

    def gbpa_changed(self, gbpa: GbpaState) -> None:
        """Ignore."""

    def ste_changed(self, first_sid: int, last_sid: int) -> bool:
        """Accept."""
        return True

    def invalidate(self, batch: Sequence[QueuedCommand]) -> int:
        """Accept all."""
        return len(batch)

    def sync(self) -> None:
        """Ignore."""

    def reset(self) -> None:
        """Ignore."""


class RecordingConfigSink:
    """A sink that records every call in :attr:`calls` as ``(name, *args)`` tuples.

    ``reject_sids`` makes ``ste_changed`` fail when the range touches one of
    them; ``fail_opcodes`` makes ``invalidate`` stop at the first command
    with one of those opcodes.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.reject_sids: set[int] = set()
        self.fail_opcodes: set[CmdOpcode] = set()

    def smmu_enable_changed(self, enabled: bool, stream_table: StreamTableConfig) -> None:
        """Record ``("smmu_enable_changed", enabled, stream_table)``."""
        self.calls.append(("smmu_enable_changed", enabled, stream_table))

    def gbpa_changed(self, gbpa: GbpaState) -> None:
        """Record ``("gbpa_changed", gbpa)``."""
        self.calls.append(("gbpa_changed", gbpa))

    def ste_changed(self, first_sid: int, last_sid: int) -> bool:
        """Record ``("ste_changed", first, last)``; fail if a rejected SID is in range."""
        self.calls.append(("ste_changed", first_sid, last_sid))
        return not any(first_sid <= sid <= last_sid for sid in self.reject_sids)

    def invalidate(self, batch: Sequence[QueuedCommand]) -> int:
        """Record ``("invalidate", [opcodes...])``; stop at a failing opcode."""
        self.calls.append(("invalidate", [c.opcode for c in batch]))
        for index, command in enumerate(batch):
            if command.opcode in self.fail_opcodes:
                return index
        return len(batch)

    def sync(self) -> None:
        """Record ``("sync",)``."""
        self.calls.append(("sync",))

    def reset(self) -> None:
        """Record ``("reset",)``."""
        self.calls.append(("reset",))


class IrqLine:
    """A level-sensitive interrupt line; ``listener(level)`` is called on each change."""

    def __init__(self, name: str, listener: Callable[[bool], None] | None = None) -> None:
        self.name = name
        self.level = False
        self.listener = listener
        self.assertions = 0
        """How many times the line went from low to high."""

    def set_level(self, level: bool) -> None:
        """Drive the line; notify the listener only when the level changes."""
        if level == self.level:
            return
        self.level = level
        if level:
            self.assertions += 1
        logger.debug("irq %s %s", self.name, "asserted" if level else "deasserted")
        if self.listener is not None:
            self.listener(level)
