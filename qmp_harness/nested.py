"""The guest recipe for the nested vSMMU: service + DT + initramfs + QEMU, as one object.

:class:`NestedMachine` is an async context manager that

1. starts ``vsmmu serve`` as a subprocess (its log in ``<workdir>/service.log``)
   with the endpoints of :class:`NestedConfig`, each at StreamID = its RID;
2. dumps QEMU's virt DT, adds the ``arm,smmu-v3`` node at the BAR the guest
   is expected to assign the SMMU function (:data:`EXPECTED_SMMU_BAR`), its
   INTx as the ``combined`` SPI, an ``iommu-map`` covering only the endpoint
   RIDs and, with ``ats``, ``ats-supported`` on the PCIe host node;
3. builds an initramfs whose ``/init`` enables the SMMU function (memory
   decoding is off after enumeration) and re-probes the arm-smmu-v3 driver
   (DESIGN.md §5), after loading the endpoint drivers;
4. boots QEMU with the SMMU function and the endpoints as vfio-user-pci
   devices, verifies the BAR the guest assigned (sysfs and ``query-pci``)
   and raises :class:`NestedBootError` naming both addresses on a mismatch;
5. exposes QEMU's QMP (``vm``) and the service's QMP (``service_qmp``, with
   its events in ``service_events``).

Every failure raises :class:`NestedBootError` whose message is
:meth:`NestedMachine.failure_report`: the guest console tail, the service log
tail and the last QMP events of both sides.  Typical use::

    config = NestedConfig(append=("iommu.strict=1",))
    async with NestedMachine(env, config) as nm:
        await nm.wait_endpoint_bound(nm.endpoints[0])
        print(await nm.service("query-vsmmu-streams"))
        out = await nm.sh("head -c 64 /dev/hwrng | od -An -tx1")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient, QMPError

from guest_images.initramfs import InitFragment, build_initramfs
from guest_images.kernel import GuestKernel
from qmp_harness.console import ConsoleError
from qmp_harness.devicetree import (
    IommuMapEntry,
    SmmuV3Node,
    add_smmu_v3,
    dump_machine_dtb,
    pci_rid,
    virt_intx_spi,
    write_dtb,
)
from qmp_harness.events import EventLog
from qmp_harness.machine import DEFAULT_APPEND, BootError, Machine, MachineConfig
from qmp_harness.provision import QemuInstall

log = logging.getLogger(__name__)

SMMU_SLOT = 1
"""The SMMU function's slot: first on the bus, its 128 KiB BAR the largest 32-bit one."""
FIRST_ENDPOINT_SLOT = 2
EXPECTED_SMMU_BAR = 0x1000_0000
"""Where Linux puts the largest non-prefetchable BAR: the start of virt's 32-bit window."""
INTA = 1
ROOT_PORT_BUS = 1
ROOT_PORT_APPEND = "pci=hpmmiosize=0"
"""Without it Linux gives a hot-pluggable root port a 2 MiB 32-bit window, placed before the
SMMU's BAR; the endpoint's BAR is 64-bit prefetchable, so the port needs no 32-bit window."""
PCI_DOMAIN_BUS = "0000:00"
ATS_SUPPORTED = "ats-supported"
"""The PCIe host-bridge DT property that lets the guest enable ATS (pci-host-ecam-generic)."""
NESTED_APPEND = ("fw_devlink=permissive", "deferred_probe_timeout=30")
"""Kernel options the recipe needs: endpoint drivers wait for the re-probed SMMU."""
SERVICE_START_TIMEOUT = 30.0
SERVICE_STOP_TIMEOUT = 10.0
BAR_MARKER = "VSMMU-SMMU-BAR"
BAR_LINE = re.compile(rf"{BAR_MARKER} (0x[0-9a-fA-F]+)\s")
"""The whole address (console output arrives in pieces: never match a partial line)."""
BAR_TIMEOUT = 120.0
BIND_TIMEOUT = 60.0
TAIL_LINES = 50
EVENT_TAIL = 20
POLL_INTERVAL = 0.05
RESOURCE_FIELD_START = 0
HWRNG_CURRENT = "/sys/class/misc/hw_random/rng_current"
VIRTIO_RNG = "virtio-rng"
VIRTIO_BLK = "virtio-blk"
BLK_MODULES = ("virtio_blk",)
"""The guest modules a virtio-blk endpoint needs (add them to :attr:`NestedConfig.modules`)."""
SMMU_DRIVER = "arm-smmu-v3"


class NestedBootError(BootError):
    """The nested recipe failed: service, DT, boot, BAR placement or a guest step."""


def pci_bdf(slot: int, function: int = 0) -> str:
    """The sysfs name of a function on bus 0, e.g. ``0000:00:02.0``."""
    return f"{PCI_DOMAIN_BUS}:{slot:02x}.{function}"


@dataclasses.dataclass(frozen=True)
class NestedEndpoint:
    """One endpoint behind the vSMMU at ``slot``, SID = its RID: a virtio-rng, or a
    virtio-blk (``kind=VIRTIO_BLK``) over the raw image ``image``."""

    slot: int
    seed: int = 1
    ats: bool = False
    kind: str = VIRTIO_RNG
    behind_root_port: bool = False
    """Put the endpoint at 01:00.0 behind a hot-pluggable ``pcie-root-port`` at ``slot``."""
    image: Path | None = None
    """virtio-blk: the raw image file the service serves."""
    readonly: bool = False
    """virtio-blk: serve the image read-only."""

    def __post_init__(self) -> None:
        if (self.kind == VIRTIO_BLK) != (self.image is not None):
            raise ValueError(f"endpoint at slot {self.slot}: a {VIRTIO_BLK} needs an image, "
                             f"and only it (kind {self.kind!r}, image {self.image})")

    @property
    def name(self) -> str:
        """The endpoint's name in the service (and its socket's base name)."""
        return f"{'blk' if self.kind == VIRTIO_BLK else 'rng'}{self.slot}"

    @property
    def root_port_id(self) -> str:
        """The QEMU id of its root port (when :attr:`behind_root_port`)."""
        return f"rp{self.slot}"

    @property
    def rid(self) -> int:
        """The requester ID QEMU gives the function (the first root port's bus is 1)."""
        return pci_rid(ROOT_PORT_BUS, 0) if self.behind_root_port else pci_rid(0, self.slot)

    @property
    def sid(self) -> int:
        """Its StreamID: the DT maps RID → SID 1:1."""
        return self.rid

    @property
    def bdf(self) -> str:
        """Its sysfs name in the guest."""
        if self.behind_root_port:
            return f"0000:{ROOT_PORT_BUS:02x}:00.0"
        return pci_bdf(self.slot)

    def device_json(self, socket: Path) -> str:
        """The endpoint's ``-device``/``device_add`` JSON."""
        if not self.behind_root_port:
            return vfio_user_device(socket, self.slot, self.name)
        return json.dumps({
            "driver": "vfio-user-pci", "id": self.name, "bus": self.root_port_id, "addr": "0x0",
            "socket": {"type": "unix", "path": str(socket)},
        })

    def qemu_devices(self, socket: Path) -> list[str]:
        """Its root port (if any) and itself, as ``-device`` arguments."""
        devices = [self.device_json(socket)]
        if self.behind_root_port:
            port = json.dumps({"driver": "pcie-root-port", "id": self.root_port_id,
                               "bus": "pcie.0", "addr": f"{self.slot:#x}",
                               "chassis": self.slot, "slot": self.slot})
            devices.insert(0, port)
        return devices

    def service_spec(self) -> str:
        """The ``vsmmu serve --endpoint`` text."""
        ats = "on" if self.ats else "off"
        if self.kind == VIRTIO_BLK:
            readonly = "on" if self.readonly else "off"
            return (f"{self.kind},sid={self.sid:#x},file={self.image},readonly={readonly},"
                    f"ats={ats},name={self.name}")
        return f"{self.kind},sid={self.sid:#x},seed={self.seed},ats={ats},name={self.name}"


@dataclasses.dataclass(frozen=True)
class NestedConfig:
    """What :class:`NestedMachine` boots (defaults: one virtio-rng at slot 2, no ATS)."""

    endpoints: Sequence[NestedEndpoint] = (NestedEndpoint(FIRST_ENDPOINT_SLOT),)
    ats: bool = False
    """The vSMMU advertises ATS, the DT marks the root complex ``ats-supported``."""
    host_no_ats_nested: bool = False
    """The sim host refuses a vSTE with EATS≠0 (HWPT_ALLOC → EIO)."""
    cbadste_policy: str | None = None
    append: Sequence[str] = ()
    """Extra kernel options, e.g. ``iommu.strict=1`` or ``iommu.passthrough=1``."""
    modules: Sequence[str] = ("virtio_rng",)
    fragments: Sequence[InitFragment] = ()
    """Run by ``/init`` after the SMMU is re-probed."""
    service_args: Sequence[str] = ()
    expected_smmu_bar: int = EXPECTED_SMMU_BAR
    memory_mib: int = 512
    log_level: str = "info"
    guest_suite: str | None = None
    """The Debian suite of the guest kernel; None boots the environment's default
    (``$VSMMU_GUEST_SUITE`` or trixie).  The ``nested_machine`` fixture resolves it."""
    sanitize: bool = True
    """Run the service with ``--sanitize``; the ``nested_machine`` fixture fails the test
    when it reported a guest error of a kind not in :attr:`allowed_guest_errors`."""
    allowed_guest_errors: frozenset[str] = frozenset()
    """Sanitizer kinds a test provokes on purpose (e.g. ``"eventq-full"``)."""


def smmu_node(config: NestedConfig) -> SmmuV3Node:
    """The DT node for ``config``: at the expected BAR, INTA of its slot, endpoint RIDs only."""
    return SmmuV3Node(
        base=config.expected_smmu_bar,
        spi=virt_intx_spi(SMMU_SLOT, INTA),
        iommu_map=[IommuMapEntry(e.rid, e.sid) for e in config.endpoints],
    )


def smmu_platform_device(config: NestedConfig) -> str:
    """The platform device name Linux gives the SMMU node (``<unit-address>.<name>``)."""
    return f"{config.expected_smmu_bar:x}.smmuv3"


def init_fragments(config: NestedConfig) -> list[InitFragment]:
    """The ``/init`` steps: enable the SMMU function, report its BAR, re-probe the driver."""
    smmu = pci_bdf(SMMU_SLOT)
    enable = InitFragment(
        "vsmmu-enable-smmu-function",
        f"echo 1 > /sys/bus/pci/devices/{smmu}/enable\n"
        f'echo "{BAR_MARKER} $(head -n1 /sys/bus/pci/devices/{smmu}/resource)"\n',
    )
    probe = InitFragment(
        "vsmmu-reprobe-smmu",
        f"echo {smmu_platform_device(config)} > /sys/bus/platform/drivers_probe\n",
    )
    return [enable, probe, *config.fragments]


def vfio_user_device(socket: Path, slot: int, device_id: str, *,
                     posted_writes: bool = True) -> str:
    """The ``-device`` JSON for a vfio-user function at ``slot`` (JSON form only).

    With ``posted_writes=False`` every BAR write waits for the server's reply
    (QEMU's ``x-no-posted-writes``).
    """
    device: dict[str, object] = {
        "driver": "vfio-user-pci", "id": device_id,
        "socket": {"type": "unix", "path": str(socket)}, "addr": f"{slot:#x}",
    }
    if not posted_writes:
        device["x-no-posted-writes"] = True
    return json.dumps(device)


def smmu_function_device(socket: Path) -> str:
    """The SMMU function's ``-device`` JSON: at :data:`SMMU_SLOT`, register writes not posted.

    A strict-mode guest waits for the CMD_SYNC after every unmap's TLBI.  With a
    posted CMDQ_PROD write it waits by polling the SYNC's MSI with WFE, which TCG
    runs as a stream of vCPU exits, each waking QEMU's main loop (about 20 000
    wake-ups a second during a disk read), and those steal the host CPU the service
    needs to complete the SYNC.  Blocked in a write the service answers after the
    commands (and the MSI) are done, the vCPU sleeps instead, and finds the MSI there.
    """
    return vfio_user_device(socket, SMMU_SLOT, "vsmmu", posted_writes=False)


class NestedMachine:
    """A running service + guest (module docstring).  Use ``async with``."""

    def __init__(
        self,
        qemu: QemuInstall,
        guest: GuestKernel,
        config: NestedConfig | None = None,
        *,
        cache: Path,
        name: str = "nested",
    ) -> None:
        self.qemu = qemu
        self.guest = guest
        self.config = config or NestedConfig()
        self.cache = cache
        self.name = name
        # Unix socket paths are limited to 108 bytes: keep them short, in /tmp.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vsmmu-{name}-"))
        self.socket_dir = self.workdir / "s"
        self.service_log = self.workdir / "service.log"
        self.service_qmp = QMPClient(f"{name}-service")
        self.service_event_log = EventLog(f"{name}-service")
        self._service_proc: asyncio.subprocess.Process | None = None
        self._vm: Machine | None = None
        self.smmu_bar: int | None = None

    # -- accessors ----------------------------------------------------------

    @property
    def vm(self) -> Machine:
        """The QEMU machine (QMP ``vm.execute``, ``vm.console``, ``vm.events``)."""
        if self._vm is None:
            raise NestedBootError(f"{self.name}: machine used before start()")
        return self._vm

    @property
    def service_events(self) -> list[Mapping[str, Any]]:
        """Every QMP event the service sent since :meth:`start`, in order."""
        return self.service_event_log.events

    @property
    def endpoints(self) -> Sequence[NestedEndpoint]:
        """The endpoints behind the vSMMU."""
        return self.config.endpoints

    @property
    def service_pid(self) -> int | None:
        """The ``vsmmu serve`` process id (None before :meth:`start`)."""
        return self._service_proc.pid if self._service_proc is not None else None

    @property
    def service_exit_status(self) -> int | None:
        """The service's exit status, or None while it runs."""
        return self._service_proc.returncode if self._service_proc is not None else None

    def service_argv(self) -> list[str]:
        """The ``vsmmu serve`` command line."""
        config = self.config
        argv = [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir", str(self.socket_dir),
                "--log-level", config.log_level]
        for endpoint in config.endpoints:
            argv += ["--endpoint", endpoint.service_spec()]
        if config.ats:
            argv.append("--ats")
        if config.host_no_ats_nested:
            argv.append("--host-no-ats-nested")
        if config.cbadste_policy is not None:
            argv += ["--cbadste-policy", config.cbadste_policy]
        if config.sanitize:
            argv.append("--sanitize")
        return [*argv, *config.service_args]

    def endpoint_socket(self, endpoint: NestedEndpoint) -> Path:
        """The vfio-user socket the service serves ``endpoint`` on."""
        return self.socket_dir / f"{endpoint.name}.sock"

    def machine_config(self, dtb: Path | None = None) -> MachineConfig:
        """The QEMU configuration: kernel, initramfs, DT, vfio-user devices."""
        config = self.config
        initrd = build_initramfs(self.guest, self.cache / "initramfs",
                                 modules=config.modules, fragments=init_fragments(config))
        devices = [smmu_function_device(self.socket_dir / "smmu.sock")]
        for endpoint in config.endpoints:
            devices += endpoint.qemu_devices(self.endpoint_socket(endpoint))
        hotplug = [ROOT_PORT_APPEND] if any(e.behind_root_port for e in config.endpoints) else []
        append = " ".join([DEFAULT_APPEND, *NESTED_APPEND, *hotplug, *config.append])
        return MachineConfig(kernel=self.guest.image, initrd=initrd, append=append,
                             memory_mib=config.memory_mib, dtb=dtb, devices=devices)

    def write_dtb(self, dest: Path) -> Path:
        """Dump QEMU's DT, add the SMMU node (and ``ats-supported``), write it to ``dest``."""
        tree = dump_machine_dtb(self.qemu, self.machine_config())
        add_smmu_v3(tree, smmu_node(self.config))
        if self.config.ats:
            tree.root.find(smmu_node(self.config).pcie_node).properties[ATS_SUPPORTED] = b""
        dest.write_bytes(write_dtb(tree))
        return dest

    # -- life cycle ---------------------------------------------------------

    async def start(self, *, boot_timeout: float = BAR_TIMEOUT) -> None:
        """Start the service, boot the guest to its shell, verify the SMMU BAR.

        Raises NestedBootError (with the full failure report) on any failure.
        """
        try:
            await self._start_service()
            await self.boot_vm(boot_timeout=boot_timeout)
        except NestedBootError:
            raise
        except (BootError, ConsoleError, QMPError, OSError, TimeoutError) as exc:
            raise NestedBootError(self.failure_report(f"start failed: {exc}")) from exc

    async def kill_vm(self) -> None:
        """SIGKILL QEMU (no reset, no DMA_UNMAP: the sockets just close) and reap it.

        The service keeps running; :meth:`boot_vm` boots the next QEMU against it.
        """
        vm = self.vm
        if vm.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.pid, signal.SIGKILL)
        await vm.shutdown()

    async def boot_vm(self, *, boot_timeout: float = BAR_TIMEOUT) -> None:
        """Boot a QEMU (a fresh one after :meth:`kill_vm`) against the running service.

        Raises NestedBootError (with the full failure report) on any failure.
        """
        try:
            dtb = self.workdir / "nested.dtb"
            if not dtb.exists():
                self.write_dtb(dtb)
            self._vm = Machine(self.qemu, self.machine_config(dtb), name=self.name)
            await self._vm.start()
            await self.verify_smmu_bar(boot_timeout)
            await self._vm.wait_ready(boot_timeout)
        except NestedBootError:
            raise
        except (BootError, ConsoleError, QMPError, OSError, TimeoutError) as exc:
            raise NestedBootError(self.failure_report(f"start failed: {exc}")) from exc

    async def _start_service(self) -> None:
        argv = self.service_argv()
        log.info("%s: starting the service: %s", self.name, " ".join(argv))
        with open(self.service_log, "wb") as out:
            self._service_proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        qmp_socket = self.socket_dir / "qmp.sock"
        async with asyncio.timeout(SERVICE_START_TIMEOUT):
            while True:
                if self._service_proc.returncode is not None:
                    raise NestedBootError(self.failure_report(
                        f"vsmmu serve exited with status {self._service_proc.returncode}"))
                if qmp_socket.exists():
                    with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                        await self.service_qmp.connect(str(qmp_socket))
                        break
                await asyncio.sleep(POLL_INTERVAL)
        self.service_event_log.attach(self.service_qmp)

    async def verify_smmu_bar(self, timeout: float = BAR_TIMEOUT) -> int:
        """Wait for ``/init`` to enable the SMMU function; check sysfs and ``query-pci``.

        Both must show the BAR at ``expected_smmu_bar`` (the DT's ``reg``).
        Returns the address; raises NestedBootError naming both on a mismatch.
        """
        match = await self.vm.console.wait_for(BAR_LINE, timeout)
        sysfs = int(match.group(1), 16)
        functions = await self.vm.query_pci()
        smmu = next((f for f in functions if f["slot"] == SMMU_SLOT), None)
        regions = smmu["regions"] if smmu is not None else []
        qmp = regions[0]["address"] if regions else None
        expected = self.config.expected_smmu_bar
        if sysfs != expected or qmp != expected:
            raise NestedBootError(self.failure_report(
                f"SMMU function {pci_bdf(SMMU_SLOT)} BAR0: guest sysfs {sysfs:#x}, query-pci "
                f"{qmp if qmp is None else hex(qmp)}; the DT node was written for {expected:#x}. "
                "Another function's BAR must have been placed first: make the SMMU BAR the "
                "largest 32-bit non-prefetchable one on bus 0."))
        self.smmu_bar = sysfs
        return sysfs

    async def close(self) -> None:
        """Shut QEMU down, stop the service (SIGTERM, then SIGKILL), remove the workdir."""
        if self._vm is not None:
            try:
                await self._vm.shutdown()
            except Exception:  # the service must still be stopped
                log.exception("%s: QEMU shutdown failed", self.name)
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.service_qmp.disconnect()
        await self.service_event_log.close()
        proc = self._service_proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(SERVICE_STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s: vsmmu serve ignored SIGTERM, killing", self.name)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> NestedMachine:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- QMP and guest helpers ----------------------------------------------

    async def service(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a command on the service's QMP (raises qemu.qmp.ExecuteError)."""
        return await self.service_qmp.execute(command, arguments)

    async def unexpected_guest_errors(self) -> list[Mapping[str, Any]]:
        """The sanitizer's ``VSMMU_GUEST_ERROR`` events of kinds the config does not allow.

        Asks ``query-vsmmu`` first: its reply comes after every event sent before it.
        """
        if not self.config.sanitize:
            return []
        state = await self.service("query-vsmmu")
        counts = state["sanitizer"]["counts"]
        allowed = self.config.allowed_guest_errors
        if not any(n for kind, n in counts.items() if kind not in allowed):
            return []
        return [e for e in self.service_events if e["event"] == "VSMMU_GUEST_ERROR"
                and e["data"]["kind"] not in allowed] or [{"counts": counts}]

    async def wait_service_event(
        self, name: str, timeout: float, *, since: int = 0,
        match: Mapping[str, object] | None = None,
    ) -> Mapping[str, Any]:
        """The first service event ``name`` at index >= ``since`` whose data has ``match``.

        Raises TimeoutError if none arrives in time.
        """
        return await self.service_event_log.wait(name, timeout, since=since, match=match)

    async def sh(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command`` in the guest; return its output. Raises NestedBootError on status≠0."""
        try:
            output, status = await self.vm.console.run(command, timeout=timeout)
        except ConsoleError as exc:
            raise NestedBootError(self.failure_report(
                f"guest command {command!r}: {exc}")) from exc
        if status != 0:
            raise NestedBootError(self.failure_report(
                f"guest command {command!r} exited with {status}: {output.strip()}"))
        return output.strip()

    async def dmesg(self, pattern: str | None = None) -> str:
        """The guest kernel log (lines matching the extended regex ``pattern``)."""
        grep = f" | grep -E '{pattern}'" if pattern else ""
        output, _ = await self.vm.console.run(f"dmesg{grep}")
        return output

    async def wait_guest(self, condition: str, timeout: float = BIND_TIMEOUT) -> None:
        """Poll the shell ``condition`` in the guest until it holds (NestedBootError after)."""
        ticks = int(timeout / 0.1)
        await self.sh(
            f"i=0; until {condition}; do i=$((i+1)); [ $i -gt {ticks} ] && exit 1; "
            "sleep 0.1; done", timeout=timeout + 10)

    async def wait_endpoint_bound(self, endpoint: NestedEndpoint,
                                  timeout: float = BIND_TIMEOUT) -> None:
        """Wait until the endpoint's driver is bound and its hwrng is the current one
        (virtio-rng) or its disk exists (virtio-blk)."""
        await self.wait_guest(f"[ -e /sys/bus/pci/devices/{endpoint.bdf}/driver ]", timeout)
        if endpoint.kind == VIRTIO_RNG:
            await self.wait_guest(f"grep -q virtio_rng {HWRNG_CURRENT} 2>/dev/null", timeout)
        elif endpoint.kind == VIRTIO_BLK:
            await self.wait_guest(f"[ -b /dev/$(ls {self._block_dir(endpoint)} 2>/dev/null) ]",
                                  timeout)

    @staticmethod
    def _block_dir(endpoint: NestedEndpoint) -> str:
        return f"/sys/bus/pci/devices/{endpoint.bdf}/virtio*/block"

    async def block_device(self, endpoint: NestedEndpoint) -> str:
        """The guest's ``/dev`` node of a virtio-blk endpoint's disk, e.g. ``/dev/vda``."""
        return "/dev/" + await self.sh(f"ls {self._block_dir(endpoint)}")

    async def iommu_group(self, endpoint: NestedEndpoint) -> str | None:
        """The guest IOMMU group number of ``endpoint`` (None without one)."""
        output, status = await self.vm.console.run(
            f"basename $(readlink /sys/bus/pci/devices/{endpoint.bdf}/iommu_group)")
        return output.strip() if status == 0 and output.strip() else None

    async def read_hwrng(self, length: int, block: int = 4096) -> HwrngSample:
        """Read ``length`` bytes of ``/dev/hwrng`` in the guest; digests for checking.

        Linux's hwrng fill kthread may take 64-byte chunks in the middle (on
        6.12 writing 0 to ``rng_quality`` does not stop it), so the digest of
        every ``block`` is returned too.
        """
        blocks = length // block
        out = await self.sh(
            f"dd if=/dev/hwrng of=/tmp/rng bs={block} count={blocks} 2>/dev/null && "
            f"wc -c < /tmp/rng && od -An -tx1 -v -N{PROBE_BYTES} /tmp/rng | tr -d ' \\n' && "
            "echo && sha256sum /tmp/rng && "
            f"i=0; while [ $i -lt {blocks} ]; do "
            f"dd if=/tmp/rng bs={block} skip=$i count=1 2>/dev/null | sha256sum; "
            "i=$((i+1)); done; rm /tmp/rng", timeout=max(120.0, length / 8192))
        lines = out.splitlines()
        return HwrngSample(
            length=int(lines[0]), probe=bytes.fromhex(lines[1]),
            digest=bytes.fromhex(lines[2].split()[0]), block=block,
            block_digests=[bytes.fromhex(line.split()[0]) for line in lines[3:]])

    # -- failure reports ------------------------------------------------------

    def service_log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines ``vsmmu serve`` logged."""
        if not self.service_log.exists():
            return "(no service log)"
        return "\n".join(self.service_log.read_text(errors="replace").splitlines()[-lines:])

    def failure_report(self, reason: str) -> str:
        """``reason``, then the console tail, the service log tail, both sides' last events."""
        console = self._vm.console.tail(TAIL_LINES) if self._vm and self._vm._console \
            else "(no console)"
        qemu_events = self._vm.events[-EVENT_TAIL:] if self._vm else []
        stderr = self._vm.stderr_text() if self._vm else ""
        status = self._service_proc.returncode if self._service_proc else None
        return (
            f"{self.name}: {reason}\n"
            f"--- guest console, last {TAIL_LINES} lines ---\n{console}\n"
            f"--- vsmmu service log ({self.service_log}, exit status {status}), "
            f"last {TAIL_LINES} lines ---\n{self.service_log_tail()}\n"
            f"--- last {EVENT_TAIL} QEMU QMP events ---\n{_format_events(qemu_events)}\n"
            f"--- last {EVENT_TAIL} service QMP events ---\n"
            f"{_format_events(self.service_events[-EVENT_TAIL:])}\n"
            f"--- QEMU stderr ---\n{stderr}"
        )


PROBE_BYTES = 32
"""Bytes of a sample used to find where it starts in the endpoint's stream."""


@dataclasses.dataclass(frozen=True)
class HwrngSample:
    """What the guest read from ``/dev/hwrng``, as digests (the data stays in the guest)."""

    length: int
    probe: bytes
    """Its first :data:`PROBE_BYTES` bytes."""
    digest: bytes
    """SHA-256 of all of it."""
    block: int
    block_digests: list[bytes]

    def sha256_hex(self) -> str:
        """The whole-sample digest as the guest's ``sha256sum`` printed it."""
        return self.digest.hex()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()


def _format_events(events: Sequence[Mapping[str, Any]]) -> str:
    if not events:
        return "(none)"
    return "\n".join(json.dumps(dict(e), default=str, sort_keys=True) for e in events)


__all__ = [
    "BLK_MODULES",
    "EXPECTED_SMMU_BAR",
    "SMMU_SLOT",
    "VIRTIO_BLK",
    "VIRTIO_RNG",
    "HwrngSample",
    "NestedBootError",
    "NestedConfig",
    "NestedEndpoint",
    "NestedMachine",
    "init_fragments",
    "pci_bdf",
    "smmu_function_device",
    "smmu_node",
    "vfio_user_device",
]
