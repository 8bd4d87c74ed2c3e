"""The two SMMUs a scenario runs on, behind one interface.

* :class:`QemuSmmuTarget` — QEMU's own SMMUv3 (``-M virt,iommu=smmuv3``,
  registers at :data:`QEMU_SMMU_BASE`) and QEMU's ``iommu-testdev`` at
  00:02.0, so its StreamID is the requester ID 0x10.
* :class:`VsmmuTarget` — ``vsmmu serve`` with ``--endpoint
  iommu-testdev,sid=0x10``: our SMMU function at 00:01.0 and our emulated
  iommu-testdev at 00:02.0, both ``vfio-user-pci`` (RAM is a shared memfd,
  so the service sees what qtest writes).

Both start one QEMU under qtest (:class:`~qmp_harness.qtest.QtestMachine`)
that is reused for every scenario: :meth:`Target.reset` is a
``system_reset`` (which also resets our functions over vfio-user) followed by
the same BAR assignment as at start.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from qmp_harness.provision import QemuInstall
from qmp_harness.qtest import (
    PCI_BAR0,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PciBus,
    PciFunction,
    Qtest,
    QtestConfig,
    QtestError,
    QtestMachine,
    ecam_address,
)

log = logging.getLogger(__name__)

QEMU_SMMU_BASE = 0x0905_0000
SMMU_SLOT = 1
TESTDEV_SLOT = 2
#: Bus 0, device 2, function 0: the requester ID QEMU's SMMU uses as StreamID.
TESTDEV_SID = TESTDEV_SLOT << 3
TESTDEV_VENDOR_DEVICE = (0x1B36, 0x0005)
SERVICE_START_TIMEOUT = 30.0
SERVICE_STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


class Target(abc.ABC):
    """One SMMU + one iommu-testdev under qtest (module docstring).  ``async with``."""

    #: Short name used in reports ("qemu", "vsmmu").
    name: str
    #: StreamID of the iommu-testdev's transactions.
    sid = TESTDEV_SID

    def __init__(self, install: QemuInstall) -> None:
        self.install = install
        self._machine: QtestMachine | None = None
        self._functions: list[PciFunction] = []

    @property
    def machine(self) -> QtestMachine:
        """The QEMU under qtest.

        :raises QtestError: before :meth:`start`.
        """
        if self._machine is None:
            raise QtestError(f"target {self.name} used before start()")
        return self._machine

    @property
    def qtest(self) -> Qtest:
        """The qtest connection."""
        return self.machine.qtest

    @property
    @abc.abstractmethod
    def smmu_base(self) -> int:
        """Where the SMMU's register page 0 is."""

    @property
    def testdev_bar(self) -> int:
        """The iommu-testdev's BAR0."""
        return self._function(TESTDEV_SLOT).bar(0)

    def _function(self, slot: int) -> PciFunction:
        for function in self._functions:
            if function.slot == slot:
                return function
        raise QtestError(f"target {self.name}: no function at 00:{slot:02x}.0")

    @abc.abstractmethod
    def qtest_config(self) -> QtestConfig:
        """The QEMU configuration."""

    async def start(self) -> None:
        """Start QEMU under qtest and assign the BARs.

        :raises QtestError: QEMU did not start, or the test device is missing.
        """
        self._machine = QtestMachine(self.install, self.qtest_config(), name=f"diff-{self.name}")
        await self._machine.start()
        self._functions = await PciBus(self.qtest).setup()
        testdev = self._function(TESTDEV_SLOT)
        if (testdev.vendor_id, testdev.device_id) != TESTDEV_VENDOR_DEVICE:
            raise QtestError(f"target {self.name}: 00:02.0 is {testdev.vendor_id:04x}:"
                             f"{testdev.device_id:04x}, expected iommu-testdev 1b36:0005")

    async def reset(self) -> None:
        """``system_reset``, then the BARs and COMMAND as assigned at start."""
        await self.machine.system_reset()
        lines = []
        for function in self._functions:
            for index, (address, _) in function.bars.items():
                lines.append(f"writel {ecam_address(0, function.slot, 0, PCI_BAR0 + 4 * index):#x}"
                             f" {address:#x}")
            command = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
            lines.append(f"writew {ecam_address(0, function.slot, 0, PCI_COMMAND):#x} "
                         f"{command:#x}")
        await self.qtest.pipeline(lines)

    def failure_report(self, reason: str) -> str:
        """``reason`` with QEMU's stderr (and the service's log, for ours)."""
        return self.machine.failure_report(reason)

    async def restart(self) -> None:
        """Start afresh after a failure (QEMU, and the service for ours)."""
        await self.close()
        await self.start()

    async def close(self) -> None:
        """Stop QEMU."""
        if self._machine is not None:
            await self._machine.close()
            self._machine = None

    async def __aenter__(self) -> Target:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class QemuSmmuTarget(Target):
    """QEMU's SMMUv3 and QEMU's iommu-testdev."""

    name = "qemu"

    @property
    def smmu_base(self) -> int:
        """virt's SMMUv3 platform device."""
        return QEMU_SMMU_BASE

    def qtest_config(self) -> QtestConfig:
        """``iommu=smmuv3`` plus ``-device iommu-testdev`` at 00:02.0."""
        return QtestConfig(devices=[f"iommu-testdev,addr={TESTDEV_SLOT:#x}"],
                           machine_options=["iommu=smmuv3"])


class VsmmuTarget(Target):
    """``vsmmu serve`` (our SMMU and our iommu-testdev endpoint) as two vfio-user functions."""

    name = "vsmmu"

    def __init__(self, install: QemuInstall, *, service_args: tuple[str, ...] = ()) -> None:
        super().__init__(install)
        self.service_args = service_args
        self.workdir = Path(tempfile.mkdtemp(prefix="vsmmu-diff-"))
        self.socket_dir = self.workdir / "s"
        self.service_log = self.workdir / "service.log"
        self._service: asyncio.subprocess.Process | None = None

    @property
    def smmu_base(self) -> int:
        """BAR0 of our SMMU function."""
        return self._function(SMMU_SLOT).bar(0)

    def service_argv(self) -> list[str]:
        """The ``vsmmu serve`` command line."""
        return [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir", str(self.socket_dir),
                "--endpoint", f"iommu-testdev,sid={TESTDEV_SID:#x}", "--log-level", "warning",
                *self.service_args]

    def qtest_config(self) -> QtestConfig:
        """Two vfio-user-pci functions: the SMMU at 00:01.0, the test device at 00:02.0."""
        devices = []
        for slot, socket in ((SMMU_SLOT, "smmu.sock"), (TESTDEV_SLOT, "iommu-testdev0.sock")):
            devices.append(json.dumps({
                "driver": "vfio-user-pci", "addr": f"{slot:#x}",
                "socket": {"type": "unix", "path": str(self.socket_dir / socket)}}))
        return QtestConfig(devices=devices)

    async def start(self) -> None:
        """Start the service, wait for its sockets, then QEMU.

        :raises QtestError: the service exited or its sockets did not appear.
        """
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        with open(self.service_log, "wb") as out:
            self._service = await asyncio.create_subprocess_exec(
                *self.service_argv(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        wanted = [self.socket_dir / name for name in ("smmu.sock", "iommu-testdev0.sock",
                                                      "qmp.sock")]
        try:
            async with asyncio.timeout(SERVICE_START_TIMEOUT):
                while not all(path.exists() for path in wanted):
                    if self._service.returncode is not None:
                        raise QtestError(f"vsmmu serve exited with status "
                                         f"{self._service.returncode}: {self.service_output()}")
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError as exc:
            raise QtestError(f"vsmmu serve sockets missing after {SERVICE_START_TIMEOUT}s: "
                             f"{self.service_output()}") from exc
        await super().start()

    def service_output(self) -> str:
        """The end of the service's log."""
        try:
            return self.service_log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def failure_report(self, reason: str) -> str:
        """QEMU's stderr and the service's log."""
        return (f"{super().failure_report(reason)}\n--- vsmmu serve log ---\n"
                f"{self.service_output()}")

    async def close(self) -> None:
        """Stop QEMU, then the service (SIGTERM, SIGKILL after a timeout)."""
        await super().close()
        proc = self._service
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(SERVICE_STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._service = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)
