"""Debugging aids for guest-driver and VMM authors, and their QMP commands.

:class:`Diagnostics` gives one service

* the **sanitizer** (:mod:`vsmmu.sanitizer`), on with ``vsmmu serve
  --sanitize`` or ``x-vsmmu-sanitize``: each violation is the QMP event
  ``VSMMU_GUEST_ERROR`` (kind, sid/ssid/asid/iova, words, command index,
  message) and a warning log line, counted in ``query-vsmmu``'s
  ``sanitizer``.  While it is on, each endpoint's DMA port is wrapped in a
  :class:`~vsmmu.sanitizer.SanitizedDmaPort`; while it is off nothing is;
* **host-side faults**: ``x-vsmmu-inject-vevent`` hands the translator a
  vEVENTQ record exactly as a read of the host's vEVENTQ returns it (the
  event with the StreamID the host replaced by the vSID, or a LOST_EVENTS
  header), and ``x-vsmmu-fail`` arms a
  :class:`~vsmmu.iommufd.faults.FaultInjectingBackend` put in front of the
  translator's backend on first use, whichever backend it is.

What the guest sees for each injected failure is the translator's documented
behaviour (README "Fault injection").
"""

from __future__ import annotations

import asyncio
import errno as errno_module
import logging
from collections.abc import Callable, Mapping

from vsmmu.arch.events import EVENT_SIZE, EVT, EventId, encode_event
from vsmmu.endpoints.base import DmaPort, Endpoint
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import ObjType
from vsmmu.iommufd.faults import BackendOp, FaultInjectingBackend
from vsmmu.iommufd.sim.physical_smmu import FORWARDED_EVENTS
from vsmmu.iommufd.veventq import vevent_record
from vsmmu.nesting import NestingTranslator
from vsmmu.qmp import Arg, Arguments, QmpCommandError, QmpMonitor
from vsmmu.sanitizer import GuestError, SanitizedDmaPort, Sanitizer
from vsmmu.smmu import SmmuV3

logger = logging.getLogger(__name__)

SYNC_IDLE_S = 5.0
"""How long the command queue must stay idle with an unsynced invalidation before it is
reported: Linux submits long invalidation runs in batches of 64 with one CMD_SYNC at the
end, so the gap between batches is not "idle"; a guest vCPU descheduled on a loaded host
can leave seconds between them."""
_DWORD = 8
_EVENT_DWORDS = EVENT_SIZE // _DWORD

Emit = Callable[[str, dict[str, object]], None]


class Diagnostics:
    """The sanitizer and fault injection of one service (module docstring)."""

    def __init__(self, smmu: SmmuV3, translator: NestingTranslator,
                 endpoints: Mapping[int, Endpoint], ports: Mapping[int, DmaPort], emit: Emit,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.smmu = smmu
        self.translator = translator
        self.endpoints = endpoints
        self.ports = ports
        """The DMA port the service bound to each emulated endpoint, by StreamID."""
        self.emit = emit
        self.loop = loop
        self.sanitizer = Sanitizer(smmu, translator, self._guest_error,
                                   on_pending_sync=self._arm_idle_check)
        self.faults: FaultInjectingBackend | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._vevent_sequence = 0

    # ------------------------------------------------------------ sanitizer

    def set_sanitize(self, on: bool) -> None:
        """Turn the sanitizer on (wrapping every endpoint's DMA port) or off (unwrapping)."""
        if on == self.sanitizer.enabled:
            return
        if on:
            self.sanitizer.enable()
        else:
            self.sanitizer.disable()
            self._cancel_idle_check()
        for sid, port in self.ports.items():
            endpoint = self.endpoints[sid]
            endpoint.bind_dma(SanitizedDmaPort(port, self.sanitizer, sid) if on else port)

    def _guest_error(self, error: GuestError) -> None:
        logger.warning("guest error: %s", error)
        self.emit("VSMMU_GUEST_ERROR", error.qmp())

    def _arm_idle_check(self, generation: int) -> None:
        if self.loop is None:
            return
        self._cancel_idle_check()
        self._idle_check = self.loop.call_later(SYNC_IDLE_S, self.sanitizer.queue_idle,
                                                generation)

    def _cancel_idle_check(self) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None

    def close(self) -> None:
        """Stop the sanitizer's timer and unhook it from the model."""
        self._cancel_idle_check()
        self.sanitizer.disable()

    def summary(self) -> dict[str, object]:
        """``query-vsmmu``'s ``sanitizer`` and ``fault-injection`` members."""
        faults = self.faults
        return {"sanitizer": self.sanitizer.summary(),
                "fault-injection": {
                    "armed": faults.armed() if faults is not None else {},
                    "injected": {op.value: n for op, n in faults.injected.items()}
                    if faults is not None else {}}}

    # ------------------------------------------------------------ QMP

    def register(self, monitor: QmpMonitor) -> None:
        """Register ``x-vsmmu-sanitize``, ``x-vsmmu-fail`` and ``x-vsmmu-inject-vevent``."""
        monitor.register("x-vsmmu-sanitize", self._qmp_sanitize,
                         doc="Turn the guest-driver sanitizer on or off.",
                         args=[Arg("enable", bool)])
        monitor.register("x-vsmmu-fail", self._qmp_fail,
                         doc="Make the next COUNT backend calls of OP fail with ERRNO "
                             "(hwpt_invalidate: at batch entry ENTRY); COUNT 0 disarms.",
                         args=[Arg("op", str), Arg("errno", str),
                               Arg("count", int, optional=True),
                               Arg("entry", int, optional=True)])
        monitor.register("x-vsmmu-inject-vevent", self._qmp_inject_vevent,
                         doc="Deliver an ARM event record (physical StreamID SID of an "
                             "endpoint) or a LOST_EVENTS overflow as the host vEVENTQ would.",
                         args=[Arg("sid", int, optional=True),
                               Arg("event-id", int, optional=True),
                               Arg("dwords", list, optional=True),
                               Arg("lost-events", bool, optional=True)])

    def _qmp_sanitize(self, args: Arguments) -> dict[str, object]:
        self.set_sanitize(bool(args["enable"]))
        return self.sanitizer.summary()

    def _qmp_fail(self, args: Arguments) -> dict[str, object]:
        try:
            op = BackendOp(args["op"])
        except ValueError:
            raise QmpCommandError(f"op {args['op']!r}: expected one of "
                                  f"{[o.value for o in BackendOp]}") from None
        err = _errno(args["errno"])
        faults = self.faults
        if faults is None:
            # First use: put the wrapper in front of whatever backend the translator drives.
            faults = self.faults = FaultInjectingBackend(self.translator.backend)
            self.translator.backend = faults
        try:
            faults.arm(op, err, args.get("count", 1), args.get("entry", 0))
        except ValueError as exc:
            raise QmpCommandError(str(exc)) from None
        return {"armed": faults.armed()}

    def _qmp_inject_vevent(self, args: Arguments) -> dict[str, object]:
        guest = self.translator.guest_objects
        if guest is None or guest.veventq is None:
            raise QmpCommandError("no vEVENTQ: the guest has not enabled the SMMU (or the "
                                  "host refused nesting)")
        header_flags = 0
        record = b""
        vsid: int | None = None
        if args.get("lost-events", False):
            if "sid" in args or "event-id" in args or "dwords" in args:
                raise QmpCommandError("lost-events takes no sid, event-id or dwords")
            header_flags = uapi.VeventqFlag.LOST_EVENTS
        else:
            if "sid" not in args:
                raise QmpCommandError("sid (the endpoint's physical StreamID) is required")
            vsid = self._vsid_of(args["sid"])
            words = self._event_words(args)
            event_id = EVT.ID.get(words[0])
            if event_id not in FORWARDED_EVENTS:
                raise QmpCommandError(f"event id {event_id:#04x}: the host forwards only "
                                      f"{sorted(hex(e) for e in FORWARDED_EVENTS)}")
            words[0] = EVT.SID.put(words[0], vsid)  # the host puts the vSID in the record
            record = b"".join(w.to_bytes(_DWORD, "little") for w in words)
        data = vevent_record(header_flags, self._vevent_sequence, record or None)
        self._vevent_sequence = (self._vevent_sequence + 1) & uapi.VEVENTQ_SEQUENCE_MASK
        logger.warning("QMP injects a vEVENTQ record: %s",
                       "LOST_EVENTS" if header_flags else f"{record.hex()} (vSID {vsid:#x})")
        events = self.translator.deliver_vevents(data)
        return {"vsid": vsid, "events": events, "lost-events": bool(header_flags)}

    def _vsid_of(self, psid: int) -> int:
        """The vSID the host would report for physical StreamID ``psid`` (its vDEVICE)."""
        translator = self.translator
        devices = {o.id: o for o in translator.backend.objects() if o.type is ObjType.DEVICE}
        for stream in translator.streams():
            info = devices.get(stream.dev_id)
            if info is not None and info.detail.get("sid") == psid:
                if stream.vdev_id is None:
                    raise QmpCommandError(f"physical SID {psid:#x} ({stream.name}) has no "
                                          "vDEVICE: the host would not forward its events")
                return stream.sid
        raise QmpCommandError(f"physical SID {psid:#x}: no endpoint device has it")

    @staticmethod
    def _event_words(args: Arguments) -> list[int]:
        dwords = args.get("dwords")
        if dwords is not None:
            if len(dwords) > _EVENT_DWORDS or not all(
                    isinstance(w, int) and 0 <= w < 1 << 64 for w in dwords):
                raise QmpCommandError(f"dwords {dwords!r}: expected up to {_EVENT_DWORDS} "
                                      "64-bit integers")
            return [*dwords, *[0] * (_EVENT_DWORDS - len(dwords))]
        event_id = args.get("event-id", int(EventId.C_BAD_STE))
        try:
            raw = encode_event(EventId(event_id), sid=0)
        except ValueError:
            raise QmpCommandError(f"event-id {event_id!r}: not an SMMUv3 event id") from None
        return [int.from_bytes(raw[i:i + _DWORD], "little") for i in range(0, EVENT_SIZE, _DWORD)]


def _errno(text: str) -> int:
    """``"EIO"`` or ``"5"`` → 5. Raises QmpCommandError for anything else."""
    value = getattr(errno_module, text, None) if text.isidentifier() else None
    if isinstance(value, int):
        return value
    try:
        number = int(text, 0)
    except ValueError:
        raise QmpCommandError(f"errno {text!r}: expected a name such as EIO or a number") \
            from None
    if number <= 0:
        raise QmpCommandError(f"errno {number}: expected a positive errno")
    return number
