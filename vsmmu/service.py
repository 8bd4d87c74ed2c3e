"""The vsmmu service: one vSMMU, its endpoints, an iommufd backend and a QMP monitor.

:class:`Service` composes, on one asyncio event loop:

* the vSMMU as a **vfio-user PCI function** (socket ``<socket_dir>/smmu.sock``):
  BAR 0 is the model's 128 KiB register space (posted writes in order, reads
  synchronous), INTx is the model's combined wired interrupt, and the class
  code is "unassigned" so no guest PCI driver binds the function (the guest's
  arm-smmu-v3 driver reaches the BAR through a DT node, DESIGN.md §5).  The
  function's DMA map table is the model's guest memory (by GPA, bounds
  checked) and is mirrored into the translator's IOAS;
* N **endpoints**, each its own vfio-user function (``<socket_dir>/<name>.sock``)
  at a guest StreamID, with an iommufd device (a sim mock device) and a DMA
  port whose every access goes through the translator and the backend;
* the :class:`~vsmmu.nesting.NestingTranslator` and the backend
  (``sim`` by default, ``kernel`` for /dev/iommu with VFIO cdev endpoints);
* a **QMP monitor** (``<socket_dir>/qmp.sock`` unless given) with the commands
  ``query-vsmmu``, ``query-vsmmu-streams``, ``query-vsmmu-iommufd``,
  ``x-vsmmu-inject-transaction``, ``x-vsmmu-write-ste`` and the events
  ``VSMMU_EVENT`` (every record written to the guest event queue, decoded),
  ``VSMMU_CERROR`` (the command queue stopped) and ``VSMMU_HWPT_ALLOC``.

Life cycle: :meth:`Service.start` binds every socket; a QEMU disconnect from the
SMMU function tears the guest state down (as a device reset does) and the
service keeps listening so QEMU can reconnect, unless
``exit_on_disconnect``; :meth:`Service.stop` (SIGTERM/SIGINT in ``vsmmu serve``)
closes the sockets and destroys every iommufd object the service created.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Sequence
from pathlib import Path

from vsmmu.arch.commands import COMMAND_SIZE, CError, decode_command
from vsmmu.arch.events import Event
from vsmmu.arch.registers import (
    CMDQ_CONS,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GERROR,
    QUEUE_BASE,
    REGISTER_SPACE_SIZE,
    QueueIndex,
)
from vsmmu.arch.ste import STE_SIZE
from vsmmu.diagnostics import Diagnostics
from vsmmu.endpoints.base import Endpoint, EndpointDmaError, EndpointError, make_endpoint
from vsmmu.endpoints.passthrough import VfioPassthrough
from vsmmu.iommufd.backend import HostMapping, IommufdBackend, IommufdError
from vsmmu.iommufd.sim import HostPersonality, SimIommufd
from vsmmu.nesting import (
    CBadStePolicy,
    NestingTranslator,
    StreamFault,
    TranslatorObserver,
    VsteWords,
)
from vsmmu.qmp import Arg, Arguments, QmpCommandError, QmpMonitor
from vsmmu.smmu import GuestMemoryError, IrqLine, SmmuFeatures, SmmuV3
from vsmmu.vfio_user import (
    BarRegion,
    DmaError,
    DmaMapping,
    DmaMapTable,
    PciDevice,
    PciIdentity,
    VfioUserServer,
)

logger = logging.getLogger(__name__)

SMMU_PCI_IDENTITY = PciIdentity(vendor_id=0x1B36, device_id=0x00FE, class_code=0xFF0000)
"""The SMMU function: the QEMU/Red Hat vendor id, a device id no driver lists, and class
0xff ("unassigned"), so no guest PCI driver binds it."""
SMMU_BAR = 0
"""The register space is BAR 0."""
SMMU_SOCKET = "smmu.sock"
QMP_SOCKET = "qmp.sock"
_DWORD = 8
_U32_LIMIT = 1 << 32
_SOCKET_DIR_MODE = 0o700
_U64_LIMIT = 1 << 64


class ServiceError(Exception):
    """The service cannot be configured or started as asked."""


class BackendKind(enum.Enum):
    """Which iommufd backend the service drives."""

    SIM = "sim"
    KERNEL = "kernel"


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """One ``--endpoint SPEC``: the endpoint's own spec and its guest StreamID."""

    spec: str
    sid: int

    @classmethod
    def parse(cls, text: str) -> EndpointConfig:
        """``"virtio-rng,sid=0x8,seed=1"`` → spec ``"virtio-rng,seed=1"``, sid 8.

        Raises ServiceError when ``sid=`` is missing or not a number.
        """
        parts = [p for p in text.split(",") if p]
        sids = [p for p in parts if p.startswith("sid=")]
        if len(sids) != 1:
            raise ServiceError(f"--endpoint {text!r}: expected exactly one sid=N")
        try:
            sid = int(sids[0].removeprefix("sid="), 0)
        except ValueError:
            raise ServiceError(f"--endpoint {text!r}: sid is not a number") from None
        if sid < 0:
            raise ServiceError(f"--endpoint {text!r}: sid {sid} is negative")
        return cls(",".join(p for p in parts if not p.startswith("sid=")), sid)


@dataclasses.dataclass
class ServiceConfig:
    """Everything ``vsmmu serve`` takes (see ``vsmmu serve --help``)."""

    socket_dir: Path
    endpoints: list[EndpointConfig] = dataclasses.field(default_factory=list)
    qmp_socket: Path | None = None
    backend: BackendKind = BackendKind.SIM
    host: HostPersonality = dataclasses.field(default_factory=HostPersonality)
    features: SmmuFeatures = dataclasses.field(default_factory=SmmuFeatures)
    cbadste_policy: CBadStePolicy = CBadStePolicy.EVENT
    trace: bool = False
    exit_on_disconnect: bool = False
    sanitize: bool = False
    """Start with the guest-driver sanitizer on (:mod:`vsmmu.diagnostics`)."""

    @property
    def qmp_path(self) -> Path:
        """The QMP socket path."""
        return self.qmp_socket if self.qmp_socket is not None else self.socket_dir / QMP_SOCKET


class DmaMapGuestMemory:
    """The model's GuestMemory over the SMMU function's DMA map table (GPA, bounds-checked)."""

    def __init__(self, table: DmaMapTable) -> None:
        self.table = table

    def read(self, gpa: int, size: int) -> bytes:
        """Guest RAM at ``gpa``. Raises GuestMemoryError outside the mapped RAM."""
        try:
            return self.table.read(gpa, size)
        except DmaError as exc:
            raise GuestMemoryError(gpa, size, str(exc)) from None

    def write(self, gpa: int, data: bytes) -> None:
        """Store into guest RAM. Raises GuestMemoryError outside the mapped RAM."""
        try:
            self.table.write(gpa, data)
        except DmaError as exc:
            raise GuestMemoryError(gpa, len(data), str(exc)) from None


class StreamDmaPort:
    """An endpoint's DmaPort: every access is a transaction of its StreamID (translated)."""

    def __init__(self, translator: NestingTranslator, sid: int) -> None:
        self.translator = translator
        self.sid = sid

    def read(self, iova: int, length: int) -> bytes:
        """DMA read. Raises EndpointDmaError when the IOMMU refuses it."""
        try:
            return self.translator.dma_read(self.sid, iova, length)
        except StreamFault as fault:
            raise EndpointDmaError(iova, fault.result.reason, length=length) from None

    def write(self, iova: int, data: bytes) -> None:
        """DMA write. Raises EndpointDmaError when the IOMMU refuses it."""
        try:
            self.translator.dma_write(self.sid, iova, data)
        except StreamFault as fault:
            raise EndpointDmaError(iova, fault.result.reason, length=len(data),
                                   write=True) from None

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """Zero-copy DMA: host views of the translated range. Raises EndpointDmaError."""
        try:
            return self.translator.dma_views(self.sid, iova, length, write)
        except StreamFault as fault:
            raise EndpointDmaError(iova, fault.result.reason, length=length,
                                   write=write) from None


class _QmpObserver(TranslatorObserver):
    """Turns translator happenings into QMP events."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def event_recorded(self, event: Event, written: bool, origin: str) -> None:
        logger.info("guest event queue <- %s (%s)%s", event, origin,
                    "" if written else " [not written]")
        data: dict[str, object] = {"type": event.name, "id": int(event.event_id),
                                   "sid": event.sid, "written": written, "origin": origin,
                                   "fields": dict(event.fields)}
        self.service.emit("VSMMU_EVENT", data)

    def event_overflow(self, origin: str) -> None:
        self.service.emit("VSMMU_EVENT", {"type": "OVERFLOW", "origin": origin,
                                          "written": False})

    def hwpt_allocated(self, sid: int, vste: VsteWords, hwpt_id: int | None,
                       error: IommufdError | None) -> None:
        self.service.emit("VSMMU_HWPT_ALLOC", {
            "sid": sid, "vste": [f"{vste.word0:#018x}", f"{vste.word1:#018x}"],
            "hwpt-id": hwpt_id, "errno": _errno_name(error.errno) if error else None,
            "error": str(error) if error else None})


def _errno_name(err: int | None) -> str | None:
    import errno as errno_module
    return errno_module.errorcode.get(err or 0, str(err)) if err else None


class Service:
    """One running vsmmu (module docstring). ``endpoints`` adds ready-made ones (tests)."""

    def __init__(self, config: ServiceConfig, *,
                 endpoints: Sequence[tuple[int, Endpoint]] = ()) -> None:
        self.config = config
        self._extra_endpoints = list(endpoints)
        self.backend: IommufdBackend | None = None
        self.translator: NestingTranslator | None = None
        self.smmu: SmmuV3 | None = None
        self.smmu_pci: PciDevice | None = None
        self.monitor: QmpMonitor | None = None
        self.diagnostics: Diagnostics | None = None
        self.dma_ports: dict[int, StreamDmaPort] = {}
        """The DMA port of each emulated endpoint (the sanitizer wraps them while on)."""
        self.servers: dict[str, VfioUserServer] = {}
        self.endpoints: dict[int, Endpoint] = {}
        self._stop_requested = asyncio.Event()
        self._started = False

    # ------------------------------------------------------------ life cycle

    @property
    def smmu_socket(self) -> Path:
        """The SMMU function's vfio-user socket."""
        return self.config.socket_dir / SMMU_SOCKET

    def endpoint_socket(self, name: str) -> Path:
        """An endpoint function's vfio-user socket."""
        return self.config.socket_dir / f"{name}.sock"

    async def start(self) -> None:
        """Build everything and start listening. Raises ServiceError / OSError."""
        if self._started:
            raise ServiceError("Service.start: already started")
        config = self.config
        # A directory we create is the owner's only; the sockets are 0600 either way.
        config.socket_dir.mkdir(mode=_SOCKET_DIR_MODE, parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self.backend = self._make_backend()
        translator = NestingTranslator(self.backend, policy=config.cbadste_policy,
                                       observer=_QmpObserver(self), loop=loop,
                                       trace=config.trace)
        self.translator = translator
        self._build_smmu_function(translator)
        try:
            for sid, endpoint in [*self._make_endpoints(), *self._extra_endpoints]:
                self._add_endpoint(sid, endpoint)
        except ServiceError:
            await self.stop()
            raise
        except EndpointError as exc:
            await self.stop()
            raise ServiceError(str(exc)) from None
        assert self.smmu is not None
        self.diagnostics = Diagnostics(self.smmu, translator, self.endpoints, self.dma_ports,
                                       self.emit, loop)
        self.diagnostics.set_sanitize(config.sanitize)
        self.monitor = QmpMonitor(config.qmp_path)
        self._register_qmp(self.monitor)
        try:
            await self.monitor.start()
            for name, server in self.servers.items():
                await server.start()
                logger.info("%s listening on %s", name, server.path)
        except BaseException:
            await self.stop()
            raise
        self._started = True
        logger.info("vsmmu serving: SMMU on %s, %d endpoint(s), %s backend, QMP on %s",
                    self.smmu_socket, len(self.endpoints), self.backend.name, config.qmp_path)

    async def stop(self) -> None:
        """Close every socket (tearing the guest state down) and destroy every object."""
        for server in list(self.servers.values()):
            with contextlib.suppress(Exception):
                await server.close()
        self.servers.clear()
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None
        if self.diagnostics is not None:
            self.diagnostics.close()
            self.diagnostics = None
        if self.translator is not None:
            self.translator.close()
            self.translator = None
        if self.backend is not None:
            if isinstance(self.backend, SimIommufd):
                for dev in [o.id for o in self.backend.objects() if o.type.value == "device"]:
                    with contextlib.suppress(IommufdError):
                        self.backend.destroy_mock_device(dev)
            self.backend.close()
            self.backend = None
        self._started = False
        self._stop_requested.set()
        logger.info("vsmmu stopped")

    def request_stop(self) -> None:
        """Ask :meth:`wait_stop_requested` to return (signal handlers, disconnect)."""
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        """Wait until someone asked the service to stop."""
        await self._stop_requested.wait()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def emit(self, event: str, data: dict[str, object]) -> None:
        """Emit a QMP event (dropped before the monitor exists)."""
        if self.monitor is not None:
            self.monitor.emit(event, data)

    # ------------------------------------------------------------ composition

    def _make_backend(self) -> IommufdBackend:
        if self.config.backend is BackendKind.SIM:
            return SimIommufd(self.config.host)
        from vsmmu.iommufd.kernel import KernelIommufd
        try:
            return KernelIommufd()
        except IommufdError as exc:
            raise ServiceError(f"--backend kernel: {exc}") from None

    def _build_smmu_function(self, translator: NestingTranslator) -> None:
        dma = DmaMapTable()
        self.smmu_pci = pci = PciDevice(
            SMMU_PCI_IDENTITY,
            {SMMU_BAR: BarRegion(REGISTER_SPACE_SIZE, self._bar_read, self._bar_write)},
            intx=True, on_reset=self._on_smmu_reset, on_disconnect=self._on_smmu_disconnect,
            dma=dma)
        irq = IrqLine("smmu-combined", self._on_irq_level)
        self.smmu = SmmuV3(DmaMapGuestMemory(dma), translator, self.config.features, irq,
                           trace=self.config.trace)
        translator.bind(self.smmu)
        dma.add_listener(on_map=self._on_dma_map, on_unmap=self._on_dma_unmap)
        self.servers["smmu"] = VfioUserServer(pci, self.smmu_socket)

    def _make_endpoints(self) -> list[tuple[int, Endpoint]]:
        made: list[tuple[int, Endpoint]] = []
        if not self.config.endpoints:
            return made
        for endpoint_config in self.config.endpoints:
            made.append((endpoint_config.sid, make_endpoint(endpoint_config.spec)))
        return made

    def _add_endpoint(self, sid: int, endpoint: Endpoint) -> None:
        assert self.translator is not None and self.backend is not None
        if sid in self.endpoints:
            raise ServiceError(f"endpoint {endpoint.name}: StreamID {sid:#x} is taken by "
                               f"{self.endpoints[sid].name}")
        translator = self.translator
        if isinstance(endpoint, VfioPassthrough):
            # The host device does its own DMA through the host SMMU: no DMA port.
            try:
                dev_id = endpoint.bind(
                    self.backend,
                    on_bound=lambda dev: translator.add_endpoint(sid, dev, endpoint.name),
                    on_unbinding=lambda _dev: translator.remove_endpoint(sid))
            except EndpointError as exc:
                raise ServiceError(str(exc)) from None
            translator.add_endpoint(sid, dev_id, endpoint.name)
        else:
            if not isinstance(self.backend, SimIommufd):
                raise ServiceError(f"endpoint {endpoint.name}: emulated endpoints need the sim "
                                   "backend (their DMA is translated by it)")
            dev_id = self.backend.create_mock_device(sid, name=endpoint.name)
            translator.add_endpoint(sid, dev_id, endpoint.name)
            port = self.dma_ports[sid] = StreamDmaPort(translator, sid)
            endpoint.bind_dma(port)
        self.endpoints[sid] = endpoint
        self.servers[endpoint.name] = VfioUserServer(endpoint.pci,
                                                     self.endpoint_socket(endpoint.name))

    # ------------------------------------------------------------ SMMU function

    def _bar_read(self, offset: int, size: int) -> int:
        assert self.smmu is not None
        return self.smmu.read(offset, size)

    def _bar_write(self, offset: int, data: bytes) -> None:
        smmu = self.smmu
        assert smmu is not None
        was_stopped = smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask
        smmu.write(offset, len(data), int.from_bytes(data, "little"))
        if not was_stopped and smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask:
            self._report_cerror(smmu)

    def _report_cerror(self, smmu: SmmuV3) -> None:
        q = QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(smmu.cmdq_base), smmu.features.cmdqs))
        index = q.index(q.pointer(smmu.cmdq_cons))
        address = QUEUE_BASE.ADDR.get(smmu.cmdq_base) + index * COMMAND_SIZE
        try:
            command = str(decode_command(smmu.memory.read(address, COMMAND_SIZE)))
        except GuestMemoryError:
            command = "(unreadable)"
        error = smmu.cmdq_error()
        logger.warning("guest command queue stopped: CERROR_%s at index %d: %s", error.name,
                       index, command)
        self.emit("VSMMU_CERROR", {"error": error.name, "code": int(error), "index": index,
                                   "command": command})

    def _on_irq_level(self, level: bool) -> None:
        assert self.smmu_pci is not None
        if level:
            self.smmu_pci.intx.assert_level()
        else:
            self.smmu_pci.intx.deassert_level()

    def _on_dma_map(self, mapping: DmaMapping) -> None:
        if mapping.memory is None or self.translator is None:
            logger.warning("guest RAM at %#x came without an fd: endpoints cannot DMA there",
                           mapping.gpa)
            return
        host = HostMapping(mapping.memory, offset=mapping.skew, length=mapping.size)
        self.translator.map_guest_ram(mapping.gpa, host)

    def _on_dma_unmap(self, mapping: DmaMapping) -> None:
        if self.translator is not None:
            self.translator.unmap_guest_ram(mapping.gpa)

    def _on_smmu_reset(self) -> None:
        logger.info("QEMU reset the vSMMU function")
        if self.smmu is not None:
            self.smmu.reset()

    def _on_smmu_disconnect(self) -> None:
        logger.info("QEMU disconnected from the vSMMU: guest state torn down%s",
                    ", exiting" if self.config.exit_on_disconnect else
                    "; waiting for a reconnect")
        if self.smmu is not None:
            self.smmu.reset()
        if self.config.exit_on_disconnect:
            self.request_stop()

    # ------------------------------------------------------------ QMP

    def _register_qmp(self, monitor: QmpMonitor) -> None:
        monitor.register("query-vsmmu", self._qmp_query_vsmmu,
                         doc="The vSMMU's state: enables, queues, GERROR, nesting.")
        monitor.register("query-vsmmu-streams", self._qmp_query_streams,
                         doc="Per endpoint StreamID (or one given sid): guest STE, vSTE, HWPT.",
                         args=[Arg("sid", int, optional=True)])
        monitor.register("query-vsmmu-iommufd", self._qmp_query_iommufd,
                         doc="The iommufd backend's object table.")
        monitor.register("x-vsmmu-inject-transaction", self._qmp_inject,
                         doc="Issue one transaction from a StreamID as if a device sent it.",
                         args=[Arg("sid", int), Arg("iova", int), Arg("ssid", int, optional=True),
                               Arg("write", bool, optional=True)])
        monitor.register("x-vsmmu-write-ste", self._qmp_write_ste,
                         doc="Fault injection: overwrite a guest STE (and apply it).",
                         args=[Arg("sid", int), Arg("dwords", list),
                               Arg("apply", bool, optional=True)])
        if self.diagnostics is not None:
            self.diagnostics.register(monitor)

    def _running(self) -> tuple[SmmuV3, NestingTranslator, IommufdBackend]:
        if self.smmu is None or self.translator is None or self.backend is None:
            raise QmpCommandError("the service is stopping")
        return self.smmu, self.translator, self.backend

    def _qmp_query_vsmmu(self, _args: Arguments) -> dict[str, object]:
        smmu, translator, backend = self._running()
        active = smmu.active_errors()
        cmdq = QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(smmu.cmdq_base), smmu.features.cmdqs))
        evtq = QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(smmu.evtq_base), smmu.features.evtqs))
        return {
            "enabled": smmu.enabled, "cr0": smmu.cr0, "gbpa": smmu.gbpa,
            "gerror": smmu.gerror, "gerrorn": smmu.gerrorn,
            "active-errors": [f.name for f in _GERROR_FIELDS if f.test(active)],
            "irq": smmu.irq.level,
            "cmdq": {"base": QUEUE_BASE.ADDR.get(smmu.cmdq_base), "log2size": cmdq.log2size,
                     "prod": smmu.cmdq_prod, "cons": smmu.cmdq_cons & cmdq.pointer_mask,
                     "error": CError(CMDQ_CONS.ERR.get(smmu.cmdq_cons)).name
                     if CMDQ_CONS.ERR.get(smmu.cmdq_cons) in CError.__members__.values()
                     else str(CMDQ_CONS.ERR.get(smmu.cmdq_cons)),
                     "consumed": smmu.commands_consumed},
            "evtq": {"base": QUEUE_BASE.ADDR.get(smmu.evtq_base), "log2size": evtq.log2size,
                     "prod": smmu.evtq_prod & evtq.pointer_mask,
                     "cons": smmu.evtq_cons & evtq.pointer_mask,
                     "overflow": EVENTQ_PROD.OVFLG.get(smmu.evtq_prod)
                     != EVENTQ_CONS.OVACKFLG.get(smmu.evtq_cons)},
            "backend": backend.name, "cbadste-policy": translator.policy.value,
            "nesting-error": translator.nesting_error,
            "guest-objects": sorted(translator.guest_object_ids()),
            "events-forwarded": translator.events_forwarded,
            "invalidations": translator.invalidations,
            **(self.diagnostics.summary() if self.diagnostics is not None else {}),
        }

    def _qmp_query_streams(self, args: Arguments) -> list[dict[str, object]]:
        smmu, translator, _ = self._running()
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

    def _qmp_query_iommufd(self, _args: Arguments) -> list[dict[str, object]]:
        _, _, backend = self._running()
        return [{"id": o.id, "type": o.type.value, "users": o.users, "detail": o.detail}
                for o in backend.objects()]

    def _qmp_inject(self, args: Arguments) -> dict[str, object]:
        _, translator, _ = self._running()
        sid, iova = args["sid"], args["iova"]
        if not 0 <= sid < _U32_LIMIT or not 0 <= iova < _U64_LIMIT:
            raise QmpCommandError(f"sid {sid} / iova {iova}: expected a 32-bit sid and a "
                                  "64-bit iova")
        result = translator.transaction(sid, iova, write=bool(args.get("write", False)),
                                        ssid=args.get("ssid"))
        return {"ok": result.ok, "reason": result.reason,
                "event": result.event.name if result.event is not None else None,
                "data": result.data.hex()}

    def _qmp_write_ste(self, args: Arguments) -> dict[str, object]:
        smmu, translator, _ = self._running()
        sid, dwords = args["sid"], args["dwords"]
        count = STE_SIZE // _DWORD
        if len(dwords) > count or not all(isinstance(w, int) and 0 <= w < 1 << 64
                                          for w in dwords):
            raise QmpCommandError(f"dwords {dwords!r}: expected up to {count} 64-bit integers")
        lookup = smmu.lookup_ste(sid)
        if lookup.address is None or lookup.status.name in ("BAD_STREAMID", "FETCH_ABORT"):
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
            applied = translator.ste_changed(sid, sid)
        after = smmu.lookup_ste(sid)
        return {"address": lookup.address, "status": after.status.name, "applied": applied}


_GERROR_FIELDS = [GERROR.CMDQ_ERR, GERROR.EVENTQ_ABT_ERR, GERROR.PRIQ_ABT_ERR,
                  GERROR.MSI_CMDQ_ABT_ERR, GERROR.MSI_EVENTQ_ABT_ERR, GERROR.MSI_PRIQ_ABT_ERR,
                  GERROR.MSI_GERROR_ABT_ERR, GERROR.SFM_ERR]


async def serve(config: ServiceConfig) -> int:
    """Run a service until SIGTERM/SIGINT (or a disconnect with ``exit_on_disconnect``)."""
    import signal

    service = Service(config)
    await service.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.request_stop)
    try:
        await service.wait_stop_requested()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await service.stop()
    return 0


__all__ = [
    "SMMU_PCI_IDENTITY",
    "BackendKind",
    "DmaMapGuestMemory",
    "EndpointConfig",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "StreamDmaPort",
    "serve",
]

