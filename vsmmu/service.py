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
* a **QMP monitor** (``<socket_dir>/qmp.sock`` unless given) with the
  commands and events of :mod:`vsmmu.service_qmp` and :mod:`vsmmu.diagnostics`.

Life cycle: the constructor builds everything; :meth:`Service.start` binds
every socket; a QEMU disconnect from the SMMU function tears the guest state
down (as a device reset does) and the service keeps listening so QEMU can
reconnect, unless ``exit_on_disconnect``; :meth:`Service.stop`
(SIGTERM/SIGINT in ``vsmmu serve``) closes the sockets and destroys every
iommufd object the service created.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Sequence
from pathlib import Path

from vsmmu.arch.registers import REGISTER_SPACE_SIZE
from vsmmu.diagnostics import Diagnostics
from vsmmu.endpoints.base import Endpoint, EndpointDmaError, EndpointError
from vsmmu.endpoints.passthrough import VfioPassthrough
from vsmmu.endpoints.registry import make_endpoint
from vsmmu.iommufd.backend import HostMapping, IommufdBackend, IommufdError, ObjType
from vsmmu.iommufd.sim import HostPersonality, SimIommufd
from vsmmu.nesting import CBadStePolicy, NestingTranslator, StreamFault
from vsmmu.qmp import QmpMonitor
from vsmmu.service_qmp import QmpEvents, ServiceCommands
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
_SOCKET_DIR_MODE = 0o700


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


class Runstate(enum.Enum):
    """Where a :class:`Service` is in its life."""

    IDLE = "idle"
    """Built, sockets not yet bound."""
    RUNNING = "running"
    STOPPED = "stopped"
    """Sockets closed and every object destroyed; a stopped service does not start again."""


class Service:
    """One vsmmu (module docstring), built whole by its constructor; ``endpoints`` adds
    ready-made ones (tests).

    Construct it on the event loop that will run it (the translator reads the
    vEVENTQ there).  Raises ServiceError when the configuration cannot be built.
    """

    def __init__(self, config: ServiceConfig, *,
                 endpoints: Sequence[tuple[int, Endpoint]] = ()) -> None:
        self.config = config
        self.runstate = Runstate.IDLE
        loop = asyncio.get_running_loop()
        self.monitor = QmpMonitor(config.qmp_path)
        events = QmpEvents(self.monitor.emit)
        self.backend = self._make_backend()
        self.translator = NestingTranslator(self.backend, policy=config.cbadste_policy,
                                            observer=events, loop=loop, trace=config.trace)
        dma = DmaMapTable()
        self.smmu_pci = PciDevice(
            SMMU_PCI_IDENTITY,
            {SMMU_BAR: BarRegion(REGISTER_SPACE_SIZE, self._bar_read, self._bar_write)},
            intx=True, on_reset=self._on_smmu_reset, on_disconnect=self._on_smmu_disconnect,
            dma=dma)
        self.smmu = SmmuV3(DmaMapGuestMemory(dma), self.translator, config.features,
                           IrqLine("smmu-combined", self._on_irq_level), trace=config.trace,
                           on_command_error=events.command_queue_stopped)
        self.translator.bind(self.smmu)
        dma.add_listener(on_map=self._on_dma_map, on_unmap=self._on_dma_unmap)
        self.servers: dict[str, VfioUserServer] = {
            "smmu": VfioUserServer(self.smmu_pci, self.smmu_socket)}
        self.endpoints: dict[int, Endpoint] = {}
        self.dma_ports: dict[int, StreamDmaPort] = {}
        """The DMA port of each emulated endpoint (the sanitizer wraps them while on)."""
        try:
            made = [(c.sid, make_endpoint(c.spec)) for c in config.endpoints]
            for sid, endpoint in [*made, *endpoints]:
                self._add_endpoint(sid, endpoint)
        except (ServiceError, EndpointError) as exc:
            self._release()
            raise ServiceError(str(exc)) from None
        self.diagnostics = Diagnostics(self.smmu, self.translator, self.endpoints,
                                       self.dma_ports, self.monitor.emit, loop)
        self.diagnostics.set_sanitize(config.sanitize)
        self.commands = ServiceCommands(self.smmu, self.translator, self.backend,
                                        self.diagnostics)
        """The QMP commands (also callable directly, as the monitor calls them)."""
        self.commands.register(self.monitor)
        self._stop_requested = asyncio.Event()

    # ------------------------------------------------------------ life cycle

    @property
    def smmu_socket(self) -> Path:
        """The SMMU function's vfio-user socket."""
        return self.config.socket_dir / SMMU_SOCKET

    def endpoint_socket(self, name: str) -> Path:
        """An endpoint function's vfio-user socket."""
        return self.config.socket_dir / f"{name}.sock"

    async def start(self) -> None:
        """Bind every socket and start listening. Raises ServiceError / OSError."""
        if self.runstate is not Runstate.IDLE:
            raise ServiceError(f"Service.start: the service is {self.runstate.value}")
        # A directory we create is the owner's only; the sockets are 0600 either way.
        self.config.socket_dir.mkdir(mode=_SOCKET_DIR_MODE, parents=True, exist_ok=True)
        self.runstate = Runstate.RUNNING
        try:
            await self.monitor.start()
            for name, server in self.servers.items():
                await server.start()
                logger.info("%s listening on %s", name, server.path)
        except BaseException:
            await self.stop()
            raise
        logger.info("vsmmu serving: SMMU on %s, %d endpoint(s), %s backend, QMP on %s",
                    self.smmu_socket, len(self.endpoints), self.backend.name,
                    self.config.qmp_path)

    async def stop(self) -> None:
        """Close every socket (tearing the guest state down) and destroy every object.

        Idempotent.
        """
        if self.runstate is Runstate.STOPPED:
            return
        self.runstate = Runstate.STOPPED
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await server.close()
        await self.monitor.close()
        self.diagnostics.close()
        self._release()
        self._stop_requested.set()
        logger.info("vsmmu stopped")

    def _release(self) -> None:
        """Destroy what the translator and the service created on the backend, then close it."""
        self.translator.close()
        if isinstance(self.backend, SimIommufd):
            for dev in [o.id for o in self.backend.objects() if o.type is ObjType.DEVICE]:
                with contextlib.suppress(IommufdError):
                    self.backend.destroy_mock_device(dev)
        self.backend.close()

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
        """Emit a QMP event to the monitor's clients."""
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

    def _add_endpoint(self, sid: int, endpoint: Endpoint) -> None:
        if sid in self.endpoints:
            raise ServiceError(f"endpoint {endpoint.name}: StreamID {sid:#x} is taken by "
                               f"{self.endpoints[sid].name}")
        translator = self.translator
        if isinstance(endpoint, VfioPassthrough):
            # The host device does its own DMA through the host SMMU: no DMA port.
            dev_id = endpoint.bind(
                self.backend,
                on_bound=lambda dev: translator.add_endpoint(sid, dev, endpoint.name),
                on_unbinding=lambda _dev: translator.remove_endpoint(sid))
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
        return self.smmu.read(offset, size)

    def _bar_write(self, offset: int, data: bytes) -> None:
        self.smmu.write(offset, len(data), int.from_bytes(data, "little"))

    def _on_irq_level(self, level: bool) -> None:
        if level:
            self.smmu_pci.intx.assert_level()
        else:
            self.smmu_pci.intx.deassert_level()

    def _on_dma_map(self, mapping: DmaMapping) -> None:
        if mapping.memory is None:
            logger.warning("guest RAM at %#x came without an fd: endpoints cannot DMA there",
                           mapping.gpa)
            return
        host = HostMapping(mapping.memory, offset=mapping.skew, length=mapping.size)
        self.translator.map_guest_ram(mapping.gpa, host)

    def _on_dma_unmap(self, mapping: DmaMapping) -> None:
        self.translator.unmap_guest_ram(mapping.gpa)

    def _on_smmu_reset(self) -> None:
        logger.info("QEMU reset the vSMMU function")
        self.smmu.reset()

    def _on_smmu_disconnect(self) -> None:
        logger.info("QEMU disconnected from the vSMMU: guest state torn down%s",
                    ", exiting" if self.config.exit_on_disconnect else
                    "; waiting for a reconnect")
        self.smmu.reset()
        if self.config.exit_on_disconnect:
            self.request_stop()


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
    "Runstate",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "StreamDmaPort",
    "serve",
]

