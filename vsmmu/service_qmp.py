"""The service's QMP commands and events.

Commands: ``query-vsmmu``, ``query-vsmmu-streams``, ``query-vsmmu-iommufd``,
``x-vsmmu-inject-transaction``, ``x-vsmmu-write-ste`` (and the diagnostics'
own, :mod:`vsmmu.diagnostics`).  Events: ``VSMMU_EVENT`` (every record written
to the guest event queue, decoded), ``VSMMU_CERROR`` (the command queue
stopped) and ``VSMMU_HWPT_ALLOC``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from vsmmu.arch.commands import CError, Command
from vsmmu.arch.events import Event
from vsmmu.arch.registers import CMDQ_CONS, EVENTQ_CONS, EVENTQ_PROD, GERROR, QUEUE_BASE
from vsmmu.arch.ste import STE_SIZE
from vsmmu.diagnostics import Diagnostics
from vsmmu.iommufd.backend import IommufdBackend, IommufdError
from vsmmu.nesting import NestingTranslator, TranslatorObserver, VsteWords
from vsmmu.qmp import Arg, Arguments, QmpCommandError, QmpMonitor
from vsmmu.smmu import GuestMemoryError, SmmuV3, SteStatus

logger = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, object]], None]

_DWORD = 8
_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64
_GERROR_FIELDS = [GERROR.CMDQ_ERR, GERROR.EVENTQ_ABT_ERR, GERROR.PRIQ_ABT_ERR,
                  GERROR.MSI_CMDQ_ABT_ERR, GERROR.MSI_EVENTQ_ABT_ERR, GERROR.MSI_PRIQ_ABT_ERR,
                  GERROR.MSI_GERROR_ABT_ERR, GERROR.SFM_ERR]
_NO_STE = (SteStatus.BAD_STREAMID, SteStatus.FETCH_ABORT)


class QmpEvents(TranslatorObserver):
    """Turns what the model and the translator report into QMP events."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def event_recorded(self, event: Event, written: bool, origin: str) -> None:
        logger.info("guest event queue <- %s (%s)%s", event, origin,
                    "" if written else " [not written]")
        self.emit("VSMMU_EVENT", {"type": event.name, "id": int(event.event_id),
                                  "sid": event.sid, "written": written, "origin": origin,
                                  "fields": dict(event.fields)})

    def event_overflow(self, origin: str) -> None:
        self.emit("VSMMU_EVENT", {"type": "OVERFLOW", "origin": origin, "written": False})

    def hwpt_allocated(self, sid: int, vste: VsteWords, hwpt_id: int | None,
                       error: IommufdError | None) -> None:
        self.emit("VSMMU_HWPT_ALLOC", {
            "sid": sid, "vste": [f"{vste.word0:#018x}", f"{vste.word1:#018x}"],
            "hwpt-id": hwpt_id,
            "errno": errno.errorcode.get(error.errno or 0, str(error.errno))
            if error is not None and error.errno else None,
            "error": str(error) if error is not None else None})

    def command_queue_stopped(self, error: CError, index: int, command: Command | None) -> None:
        """The model stopped its command queue at ``index`` (``command`` None if unreadable)."""
        text = str(command) if command is not None else "(unreadable)"
        logger.warning("guest command queue stopped: CERROR_%s at index %d: %s", error.name,
                       index, text)
        self.emit("VSMMU_CERROR", {"error": error.name, "code": int(error), "index": index,
                                   "command": text})


class ServiceCommands:
    """The QMP commands over one service's model, translator and backend."""

    def __init__(self, smmu: SmmuV3, translator: NestingTranslator, backend: IommufdBackend,
                 diagnostics: Diagnostics) -> None:
        self.smmu = smmu
        self.translator = translator
        self.backend = backend
        self.diagnostics = diagnostics

    def register(self, monitor: QmpMonitor) -> None:
        """Add every command (the diagnostics' too) to ``monitor``."""
        monitor.register("query-vsmmu", self.query_vsmmu,
                         doc="The vSMMU's state: enables, queues, GERROR, nesting.")
        monitor.register("query-vsmmu-streams", self.query_streams,
                         doc="Per endpoint StreamID (or one given sid): guest STE, vSTE, HWPT.",
                         args=[Arg("sid", int, optional=True)])
        monitor.register("query-vsmmu-iommufd", self.query_iommufd,
                         doc="The iommufd backend's object table.")
        monitor.register("x-vsmmu-inject-transaction", self.inject_transaction,
                         doc="Issue one transaction from a StreamID as if a device sent it.",
                         args=[Arg("sid", int), Arg("iova", int), Arg("ssid", int, optional=True),
                               Arg("write", bool, optional=True)])
        monitor.register("x-vsmmu-write-ste", self.write_ste,
                         doc="Fault injection: overwrite a guest STE (and apply it).",
                         args=[Arg("sid", int), Arg("dwords", list),
                               Arg("apply", bool, optional=True)])
        self.diagnostics.register(monitor)

    def query_vsmmu(self, _args: Arguments) -> dict[str, object]:
        """``query-vsmmu``."""
        smmu, translator = self.smmu, self.translator
        active = smmu.active_errors()
        cmdq, evtq = smmu.cmdq_index(), smmu.evtq_index()
        cerror = CMDQ_CONS.ERR.get(smmu.cmdq_cons)
        return {
            "enabled": smmu.enabled, "cr0": smmu.cr0, "gbpa": smmu.gbpa,
            "gerror": smmu.gerror, "gerrorn": smmu.gerrorn,
            "active-errors": [f.name for f in _GERROR_FIELDS if f.test(active)],
            "irq": smmu.irq.level,
            "cmdq": {"base": QUEUE_BASE.ADDR.get(smmu.cmdq_base), "log2size": cmdq.log2size,
                     "prod": smmu.cmdq_prod, "cons": smmu.cmdq_cons & cmdq.pointer_mask,
                     "error": CError(cerror).name if cerror in CError.__members__.values()
                     else str(cerror),
                     "consumed": smmu.commands_consumed, "sync-msis": smmu.sync_msis},
            "evtq": {"base": QUEUE_BASE.ADDR.get(smmu.evtq_base), "log2size": evtq.log2size,
                     "prod": smmu.evtq_prod & evtq.pointer_mask,
                     "cons": smmu.evtq_cons & evtq.pointer_mask,
                     "overflow": EVENTQ_PROD.OVFLG.get(smmu.evtq_prod)
                     != EVENTQ_CONS.OVACKFLG.get(smmu.evtq_cons)},
            "backend": self.backend.name, "cbadste-policy": translator.policy.value,
            "nesting-error": translator.nesting_error,
            "guest-objects": sorted(translator.guest_object_ids()),
            "events-forwarded": translator.events_forwarded,
            "invalidations": translator.invalidations,
            **self.diagnostics.summary(),
        }

    def query_streams(self, args: Arguments) -> list[dict[str, object]]:
        """``query-vsmmu-streams``."""
        smmu, translator = self.smmu, self.translator
        wanted = args.get("sid")
        out: list[dict[str, object]] = []
        sids = sorted({*(s.sid for s in translator.streams()),
                       *([wanted] if wanted is not None else [])})
        for sid in sids:
            if wanted is not None and sid != wanted:
                continue
            stream = translator.stream(sid)
            lookup = stream.lookup if stream is not None and stream.lookup is not None \
                else smmu.lookup_ste(sid)
            row: dict[str, object] = {
                "sid": sid, "status": lookup.status.name, "reason": lookup.reason,
                "ste": str(lookup.ste) if lookup.ste is not None else None,
                "ste-address": lookup.address,
            }
            if stream is not None:
                row.update({
                    "endpoint": stream.name, "dev-id": stream.dev_id,
                    "vdevice-id": stream.vdev_id,
                    "vste": str(stream.vste) if stream.vste is not None else None,
                    "hwpt-id": stream.hwpt.id if stream.hwpt is not None else None,
                    "attached-to": stream.attachment, "error": stream.error})
            out.append(row)
        return out

    def query_iommufd(self, _args: Arguments) -> list[dict[str, object]]:
        """``query-vsmmu-iommufd``."""
        return [{"id": o.id, "type": o.type.value, "users": o.users, "detail": o.detail}
                for o in self.backend.objects()]

    def inject_transaction(self, args: Arguments) -> dict[str, object]:
        """``x-vsmmu-inject-transaction``."""
        sid, iova = args["sid"], args["iova"]
        if not 0 <= sid < _U32_LIMIT or not 0 <= iova < _U64_LIMIT:
            raise QmpCommandError(f"sid {sid} / iova {iova}: expected a 32-bit sid and a "
                                  "64-bit iova")
        result = self.translator.transaction(sid, iova, write=bool(args.get("write", False)),
                                             ssid=args.get("ssid"))
        return {"ok": result.ok, "reason": result.reason,
                "event": result.event.name if result.event is not None else None,
                "data": result.data.hex()}

    def write_ste(self, args: Arguments) -> dict[str, object]:
        """``x-vsmmu-write-ste``."""
        smmu = self.smmu
        sid, dwords = args["sid"], args["dwords"]
        count = STE_SIZE // _DWORD
        if len(dwords) > count or not all(isinstance(w, int) and 0 <= w < 1 << 64
                                          for w in dwords):
            raise QmpCommandError(f"dwords {dwords!r}: expected up to {count} 64-bit integers")
        lookup = smmu.lookup_ste(sid)
        if lookup.address is None or lookup.status in _NO_STE:
            raise QmpCommandError(f"StreamID {sid:#x} has no STE in the guest's stream table "
                                  f"({lookup.status.value}: {lookup.reason})")
        data = b"".join(w.to_bytes(_DWORD, "little") for w in [*dwords, *[0] * count][:count])
        try:
            smmu.memory.write(lookup.address, data)
        except GuestMemoryError as exc:
            raise QmpCommandError(str(exc)) from None
        logger.warning("QMP overwrote the guest STE of SID %#x at %#x", sid, lookup.address)
        applied = False
        if args.get("apply", True):
            applied = self.translator.ste_changed(sid, sid)
        after = smmu.lookup_ste(sid)
        return {"address": lookup.address, "status": after.status.name, "applied": applied}


__all__ = ["QmpEvents", "ServiceCommands"]
