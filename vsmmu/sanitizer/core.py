"""The sanitizer: the guest driver's programming mistakes, found while it runs.

:class:`Sanitizer` watches one vSMMU through two hooks that cost nothing
while it is off: the model's :class:`~vsmmu.smmu.observer.SmmuObserver`
(``SmmuV3.observer``, told after each command-queue consume and when an
event is lost to a full queue) and :class:`SanitizedDmaPort`, which the
service puts in front of each endpoint's DMA port only while sanitizing.
Each violation is a :class:`GuestError` handed to the ``report`` callback
(the service makes it a QMP event and a log line) and counted by kind.

Kinds (:class:`GuestErrorKind`) and the rule each enforces:

``stale-ste``
    a transaction used an STE whose guest copy now says something else
    (in the bits its Config uses) and no CFGI_STE covering it was issued
    (IHI 0070 §3.21: a change takes effect only after CFGI_STE + CMD_SYNC);
``stale-cd``
    the same for the CD the host has cached (CFGI_CD, CFGI_CD_ALL or
    CFGI_STE make it take effect);
``stale-translation``
    a transaction hit an IOTLB entry that a fresh walk of the guest's page
    tables no longer gives (no TLBI covering that IOVA/ASID, §3.17);
``torn-ste`` / ``torn-cd``
    between two CFGIs of an entry that let traffic through before and
    after, the bits used by either configuration changed in more than one
    64-bit word: the SMMU reads an entry 64 bits at a time at any moment,
    so it could have used a mix of old and new words (§3.21.3; Linux's
    arm_smmu_write_entry goes through V=0 or abort in that case);
``res0-command``
    a command with bits set that its format leaves RES0 (chapter 4);
``missing-sync``
    a CFGI, TLBI or ATC_INV with no CMD_SYNC after it when the queue went
    idle: nothing guarantees it completed (§4.8);
``eventq-full``
    an event record was lost because the guest left its event queue full
    (§7.2: the SMMU then only flags the overflow).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import struct
from collections.abc import Callable

from vsmmu.arch.cd import CD_SIZE
from vsmmu.arch.commands import (
    CFGI_ALL_RANGE,
    CMD,
    COMMAND_SIZE,
    CmdOpcode,
    cfgi_ste_range_sids,
    decode_command_words,
)
from vsmmu.arch.events import decode_event
from vsmmu.arch.fields import words_from_bytes
from vsmmu.arch.registers import QUEUE_BASE, QueueIndex
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.endpoints.base import DmaPort
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.iommufd.stale import StaleCacheChecker
from vsmmu.nesting import NestingTranslator
from vsmmu.sanitizer.rules import (
    ENTRY_DWORDS,
    NEEDS_SYNC,
    command_res0_bits,
    ste_differs,
    torn_cd_words,
    torn_ste_words,
)
from vsmmu.smmu import GuestMemoryError, SmmuV3, SteLookup
from vsmmu.smmu.observer import SmmuObserver

logger = logging.getLogger(__name__)

_COMMAND_WORDS = struct.Struct("<QQ")
PAGE_SHIFT = 12
"""DMA is checked page by page: the IOTLB's granule."""
SEEN_LIMIT = 4096
"""Distinct DMA-time reports remembered (so one stale entry is reported once, not per access)."""


class GuestErrorKind(enum.Enum):
    """What the guest got wrong (module docstring)."""

    STALE_STE = "stale-ste"
    STALE_CD = "stale-cd"
    STALE_TRANSLATION = "stale-translation"
    TORN_STE = "torn-ste"
    TORN_CD = "torn-cd"
    RES0_COMMAND = "res0-command"
    MISSING_SYNC = "missing-sync"
    EVENTQ_FULL = "eventq-full"


@dataclasses.dataclass(frozen=True)
class GuestError:
    """One violation: its kind, what it concerns, the guest words involved, a sentence."""

    kind: GuestErrorKind
    message: str
    sid: int | None = None
    ssid: int | None = None
    asid: int | None = None
    iova: int | None = None
    words: tuple[int, ...] = ()
    index: int | None = None
    """The command queue index of the command concerned (command kinds)."""

    def qmp(self) -> dict[str, object]:
        """The ``VSMMU_GUEST_ERROR`` event data."""
        return {"kind": self.kind.value, "sid": self.sid, "ssid": self.ssid, "asid": self.asid,
                "iova": self.iova, "words": [f"{w:#018x}" for w in self.words],
                "index": self.index, "message": self.message}

    def __str__(self) -> str:
        where = " ".join(f"{name}={value:#x}" for name, value in
                         (("sid", self.sid), ("ssid", self.ssid), ("asid", self.asid),
                          ("iova", self.iova), ("index", self.index)) if value is not None)
        return f"{self.kind.value} {where}: {self.message}"


Report = Callable[[GuestError], None]


class Sanitizer(SmmuObserver):
    """Checks one vSMMU's guest (module docstring).  Off until :meth:`enable`."""

    def __init__(self, smmu: SmmuV3, translator: NestingTranslator, report: Report,
                 *, on_pending_sync: Callable[[int], None] | None = None) -> None:
        self.smmu = smmu
        self.translator = translator
        self.report = report
        self.on_pending_sync = on_pending_sync
        """Called with a generation number when invalidations wait for a CMD_SYNC: the
        service calls :meth:`queue_idle` with it once the queue has stayed idle."""
        backend = translator.backend
        self._caches = StaleCacheChecker(backend) if isinstance(backend, SimIommufd) else None
        self.counts: collections.Counter[GuestErrorKind] = collections.Counter()
        self._enabled = False
        self._ste_seen: dict[int, tuple[int, ...]] = {}
        self._cd_seen: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._unsynced: tuple[int, int, int] | None = None
        self._generation = 0
        self._dma_seen: set[tuple[object, ...]] = set()

    # ------------------------------------------------------------ switch

    @property
    def enabled(self) -> bool:
        """Whether the sanitizer is watching."""
        return self._enabled

    def enable(self) -> None:
        """Start watching: the entries of every endpoint stream as they are now are the
        baseline the next CFGIs are compared with."""
        if self._enabled:
            return
        self._enabled = True
        self._ste_seen.clear()
        self._cd_seen.clear()
        self._dma_seen.clear()
        self._unsynced = None
        for stream in self.translator.streams():
            self._observe_entries(stream.sid, None, check=False)
        self.smmu.observer = self
        logger.info("sanitizer on")

    def disable(self) -> None:
        """Stop watching (the model's hook is removed)."""
        if self.smmu.observer is self:
            self.smmu.observer = None
        self._enabled = False
        logger.info("sanitizer off")

    def summary(self) -> dict[str, object]:
        """``query-vsmmu``'s view: on/off, counts by kind, the total."""
        return {"enabled": self._enabled,
                "counts": {k.value: self.counts[k] for k in GuestErrorKind},
                "total": sum(self.counts.values())}

    def _report(self, error: GuestError) -> None:
        self.counts[error.kind] += 1
        try:
            self.report(error)
        except Exception:
            logger.exception("sanitizer report failed: %s", error)

    # ------------------------------------------------------------ model hook

    def commands_consumed(self, first: int, end: int) -> None:
        """Check each consumed command (RES0, CFGI effects, SYNC bookkeeping)."""
        try:
            self._scan(first, end)
        except Exception:
            # A checker must never take the command queue down with it.
            logger.exception("sanitizer: command scan failed")

    def _scan(self, first: int, end: int) -> None:
        smmu = self.smmu
        q = QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(smmu.cmdq_base), smmu.features.cmdqs))
        base = QUEUE_BASE.ADDR.get(smmu.cmdq_base)
        self._dma_seen.clear()
        pointer = first
        for _ in range(q.used(end, first)):
            index = q.index(pointer)
            pointer = q.increment(pointer)
            try:
                dw0, dw1 = _COMMAND_WORDS.unpack(
                    smmu.memory.read(base + index * COMMAND_SIZE, COMMAND_SIZE))
            except GuestMemoryError:
                return
            self._command(index, dw0, dw1)
        if self._unsynced is not None and self.on_pending_sync is not None:
            self._generation += 1
            self.on_pending_sync(self._generation)

    def reset(self) -> None:
        """Device reset: the entries seen before belong to a guest that is gone."""
        self._ste_seen.clear()
        self._cd_seen.clear()
        self._dma_seen.clear()
        self._unsynced = None

    def _command(self, index: int, dw0: int, dw1: int) -> None:
        res0 = command_res0_bits(dw0, dw1)
        if any(res0):
            self._report(GuestError(
                GuestErrorKind.RES0_COMMAND,
                f"{decode_command_words(dw0, dw1)}: RES0 bits {res0[0]:#x} (dw0) "
                f"{res0[1]:#x} (dw1) set", words=(dw0, dw1), index=index))
        opcode = CMD.OPCODE.get(dw0)
        if opcode == CmdOpcode.SYNC:
            self._unsynced = None
            return
        if opcode in NEEDS_SYNC and self._unsynced is None:
            self._unsynced = (index, dw0, dw1)
        if opcode == CmdOpcode.CFGI_STE or opcode == CmdOpcode.CFGI_STE_RANGE:
            first, last = (CMD.SID.get(dw0),) * 2
            if opcode == CmdOpcode.CFGI_STE_RANGE:
                range_ = CMD.RANGE.get(dw1)
                first, last = cfgi_ste_range_sids(first, range_)
                if range_ == CFGI_ALL_RANGE:
                    first = 0
            # CFGI_ALL is what a driver issues when it (re)initialises its tables: what it
            # finds is a new baseline, not an update of the entries seen before.
            check = not (opcode == CmdOpcode.CFGI_STE_RANGE
                         and CMD.RANGE.get(dw1) == CFGI_ALL_RANGE)
            for stream in self.translator.streams():
                if first <= stream.sid <= last:
                    self._observe_entries(stream.sid, index, check=check)
        elif opcode == CmdOpcode.CFGI_CD or opcode == CmdOpcode.CFGI_CD_ALL:
            sid = CMD.SID.get(dw0)
            if self.translator.stream(sid) is not None:
                self._observe_cd(sid, self.smmu.lookup_ste(sid), index, check=True)

    def _observe_entries(self, sid: int, index: int | None, *, check: bool) -> None:
        """A CFGI_STE covered ``sid``: compare its STE (and CD) with the last ones seen."""
        lookup = self.smmu.lookup_ste(sid)
        words = lookup.words
        old = self._ste_seen.pop(sid, None)
        if words is None:
            return
        self._ste_seen[sid] = words
        if check and old is not None:
            changed = torn_ste_words(old, words)
            if changed:
                self._report(GuestError(
                    GuestErrorKind.TORN_STE, _torn_message("STE", old, words, changed),
                    sid=sid, words=words, index=index))
        self._observe_cd(sid, lookup, index, check=check)

    def _observe_cd(self, sid: int, lookup: SteLookup, index: int | None, *,
                    check: bool) -> None:
        """A CFGI covered the CD of ``sid`` (SubstreamID 0, the one the host uses)."""
        old = self._cd_seen.pop(sid, None)
        words = lookup.words
        if words is None or not STE.V.test(words[0]) \
                or STE.CONFIG.get(words[0]) != SteConfig.S1_TRANS:
            return
        cd = self.smmu.lookup_cd(lookup, 0)
        if cd.address is None:
            return
        try:
            now = tuple(words_from_bytes(self.smmu.memory.read(cd.address, CD_SIZE),
                                         ENTRY_DWORDS))
        except GuestMemoryError:
            return
        self._cd_seen[sid] = (cd.address, now)
        if check and old is not None and old[0] == cd.address:
            changed = torn_cd_words(old[1], now)
            if changed:
                self._report(GuestError(
                    GuestErrorKind.TORN_CD, _torn_message("CD", old[1], now, changed),
                    sid=sid, ssid=0, words=now, index=index))

    def queue_idle(self, generation: int | None = None) -> None:
        """The command queue went idle: report an invalidation left without CMD_SYNC.

        With ``generation`` (from ``on_pending_sync``), only if no command was
        consumed since.
        """
        if generation is not None and generation != self._generation:
            return
        unsynced, self._unsynced = self._unsynced, None
        if unsynced is None or not self._enabled:
            return
        index, dw0, dw1 = unsynced
        self._report(GuestError(
            GuestErrorKind.MISSING_SYNC,
            f"{decode_command_words(dw0, dw1)} was not followed by a CMD_SYNC before the "
            "command queue went idle", sid=_sid_of(dw0), words=(dw0, dw1), index=index))

    def event_queue_full(self, record: bytes) -> None:
        """A record was lost to a full guest event queue."""
        event = decode_event(record)
        self._report(GuestError(
            GuestErrorKind.EVENTQ_FULL,
            f"{event} lost: the guest left its event queue full "
            f"(PROD={self.smmu.evtq_prod:#x} CONS={self.smmu.evtq_cons:#x})",
            sid=event.sid, words=tuple(words_from_bytes(record, len(record) // 8))))

    # ------------------------------------------------------------ DMA

    def check_dma(self, sid: int, iova: int, length: int) -> None:
        """Before an endpoint's DMA: would it use a stale STE, CD or translation?"""
        try:
            self._check_dma(sid, iova, length)
        except Exception:
            logger.exception("sanitizer: DMA check failed")

    def _check_dma(self, sid: int, iova: int, length: int) -> None:
        stream = self.translator.stream(sid)
        if stream is None or not self.smmu.enabled or stream.lookup is None:
            return
        installed = stream.lookup.words
        now = self.smmu.lookup_ste(sid).words
        if installed is None or now is None:
            return
        if installed != now and ste_differs(installed, now):
            self._once(GuestError(
                GuestErrorKind.STALE_STE,
                f"DMA at IOVA {iova:#x} used the STE installed at the last CFGI_STE; the "
                f"guest's STE now differs: {_word_diff(installed, now)}",
                sid=sid, iova=iova, words=now))
            return
        if self._caches is None:
            return
        page = iova >> PAGE_SHIFT
        last = (iova + max(length, 1) - 1) >> PAGE_SHIFT
        while page <= last:
            stale = self._caches.check(stream.dev_id, max(iova, page << PAGE_SHIFT))
            if stale is not None:
                kind = GuestErrorKind.STALE_CD if stale.what == "cd" \
                    else GuestErrorKind.STALE_TRANSLATION
                self._once(GuestError(kind, stale.reason, sid=sid, ssid=0, asid=stale.asid,
                                      iova=max(iova, page << PAGE_SHIFT)))
                if kind is GuestErrorKind.STALE_CD:
                    return
            page += 1

    def _once(self, error: GuestError) -> None:
        key = (error.kind, error.sid, error.asid,
               None if error.iova is None else error.iova >> PAGE_SHIFT, error.words)
        if key in self._dma_seen:
            return
        if len(self._dma_seen) >= SEEN_LIMIT:
            self._dma_seen.clear()
        self._dma_seen.add(key)
        self._report(error)


class SanitizedDmaPort:
    """An endpoint's DMA port with the sanitizer's check before each access."""

    def __init__(self, inner: DmaPort, sanitizer: Sanitizer, sid: int) -> None:
        self.inner = inner
        self.sanitizer = sanitizer
        self.sid = sid

    def read(self, iova: int, length: int) -> bytes:
        """Check, then read through the wrapped port."""
        self.sanitizer.check_dma(self.sid, iova, length)
        return self.inner.read(iova, length)

    def write(self, iova: int, data: bytes) -> None:
        """Check, then write through the wrapped port."""
        self.sanitizer.check_dma(self.sid, iova, len(data))
        self.inner.write(iova, data)

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """Check, then translate through the wrapped port (zero-copy data)."""
        self.sanitizer.check_dma(self.sid, iova, length)
        return self.inner.views(iova, length, write=write)


def _sid_of(dw0: int) -> int | None:
    opcode = CMD.OPCODE.get(dw0)
    if opcode in (CmdOpcode.CFGI_STE, CmdOpcode.CFGI_STE_RANGE, CmdOpcode.CFGI_CD,
                  CmdOpcode.CFGI_CD_ALL, CmdOpcode.ATC_INV):
        return CMD.SID.get(dw0)
    return None


def _word_diff(old: tuple[int, ...], new: tuple[int, ...]) -> str:
    return ", ".join(f"dw{i} {a:#018x} -> {b:#018x}"
                     for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)


def _torn_message(what: str, old: tuple[int, ...], new: tuple[int, ...],
                  changed: list[int]) -> str:
    return (f"valid {what} rewritten in place: the bits its configurations use changed in "
            f"double words {changed} between two CFGIs ({_word_diff(old, new)}); the SMMU "
            "could have read a mix (go through V=0, or change one double word per CFGI)")
