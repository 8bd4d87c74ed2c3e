"""A ``vsmmu serve`` subprocess to aim probes at, and a probe run with before/after checks.

The service runs as its own process so that whatever a probe does to it
(a SIGBUS, a blocked loop, a leak) shows as what it is: a dead or slow
process, a growing descriptor count or RSS, objects left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient

from reliability.probes import (
    REPLY_TIMEOUT_S,
    ProbeStats,
    ProcessMeter,
    hostile_register_fuzz,
    qmp_wire_fuzz,
    vfio_user_wire_fuzz,
)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
FUZZ_ENDPOINT = "fuzz0"
FUZZ_SID = 0x10
SERVICE_OWN_OBJECTS = frozenset({"ioas", "device", "hwpt_paging"})
SETTLE_TIMEOUT_S = 20.0


class ServiceProcess:
    """``vsmmu serve`` in a temporary socket directory, with a QMP client and a meter."""

    def __init__(self, extra_args: Sequence[str] = (), *,
                 endpoint: str = f"virtio-rng,sid={FUZZ_SID:#x},name={FUZZ_ENDPOINT}",
                 preexec: Callable[[], None] | None = None) -> None:
        # Unix socket paths are limited to 108 bytes: a short directory in /tmp.
        self.workdir = Path(tempfile.mkdtemp(prefix="vsmmu-rel-"))
        self.socket_dir = self.workdir / "s"
        self.log_path = self.workdir / "service.log"
        self.argv = [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir",
                     str(self.socket_dir), "--endpoint", endpoint, *extra_args]
        self.qmp = QMPClient("reliability")
        self.proc: asyncio.subprocess.Process | None = None
        self.meter: ProcessMeter | None = None
        self._preexec = preexec

    @property
    def qmp_socket(self) -> str:
        """The service's QMP socket."""
        return str(self.socket_dir / "qmp.sock")

    @property
    def smmu_socket(self) -> str:
        """The SMMU function's vfio-user socket."""
        return str(self.socket_dir / "smmu.sock")

    def endpoint_socket(self, name: str = FUZZ_ENDPOINT) -> str:
        """An endpoint's vfio-user socket."""
        return str(self.socket_dir / f"{name}.sock")

    async def start(self) -> None:
        """Start the process and connect QMP. Raises RuntimeError when it does not come up."""
        with open(self.log_path, "wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, preexec_fn=self._preexec)
        self.meter = ProcessMeter(self.proc.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"vsmmu serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if os.path.exists(self.qmp_socket):
                with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                    await self.qmp.connect(self.qmp_socket)
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"vsmmu serve did not come up:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.returncode is None and (
            self.meter is not None and self.meter.alive())

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        """A QMP command with a timeout (TimeoutError means the service hung)."""
        return await asyncio.wait_for(self.qmp.execute(command, arguments), REPLY_TIMEOUT_S)

    async def object_types(self) -> set[str]:
        """The types of the service's iommufd objects."""
        return {o["type"] for o in await self.execute("query-vsmmu-iommufd")}

    async def settle(self) -> set[str]:
        """Wait until only the service's own objects are left; return what is left then."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            left = await self.object_types() - SERVICE_OWN_OBJECTS
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.1)

    def log_text(self) -> str:
        """Everything the service logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines it logged."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM (then SIGKILL) the process and remove the directory."""
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> ServiceProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


@dataclasses.dataclass
class ProbeReport:
    """A probe run: what was sent and what the service looked like before and after."""

    vfio: ProbeStats
    qmp: ProbeStats
    registers: ProbeStats
    fds_before: int
    fds_after: int
    rss_before_kib: int
    rss_after_kib: int
    objects_left: set[str]
    alive: bool
    tracebacks: int
    seconds: float

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"probe run of {self.seconds:.0f} s; service alive: {self.alive}"]
        for name, stats in (("vfio-user fuzz", self.vfio), ("QMP fuzz", self.qmp),
                            ("hostile guest", self.registers)):
            out.append(f"  {name}: {stats.messages} messages, {stats.connections} connections, "
                       f"{stats.error_replies} error replies, {stats.dropped_by_server} dropped, "
                       f"{stats.hung} hung, p99 {stats.percentile(0.99) * 1000:.1f} ms")
        out.append(f"  service fds {self.fds_before} -> {self.fds_after}, RSS "
                   f"{self.rss_before_kib / 1024:.1f} -> {self.rss_after_kib / 1024:.1f} MiB, "
                   f"objects left {sorted(self.objects_left) or 'none'}, "
                   f"tracebacks in log {self.tracebacks}")
        return out


async def run_probes(service: ServiceProcess, *, vfio_messages: int, qmp_messages: int,
                     register_writes: int, seed: int, rounds: int = 1) -> ProbeReport:
    """Run the three probes against ``service`` (in ``rounds`` slices each), concurrently."""
    assert service.meter is not None
    start = time.monotonic()
    await service.settle()
    fds_before, rss_before = service.meter.fds(), service.meter.rss_kib()
    vfio, qmp, registers = ProbeStats(), ProbeStats(), ProbeStats()

    async def vfio_rounds() -> None:
        for n in range(rounds):
            vfio.add(await vfio_user_wire_fuzz(service.endpoint_socket(),
                                               vfio_messages // rounds, seed + n))

    async def qmp_rounds() -> None:
        for n in range(rounds):
            qmp.add(await qmp_wire_fuzz(service.qmp_socket, qmp_messages // rounds, seed + n))

    async def register_rounds() -> None:
        for n in range(rounds):
            registers.add(await hostile_register_fuzz(service.smmu_socket,
                                                      register_writes // rounds, seed + n))

    await asyncio.gather(vfio_rounds(), qmp_rounds(), register_rounds())
    alive = service.alive()
    left = await service.settle() if alive else set()
    fds_after = service.meter.fds() if alive else -1
    rss_after = service.meter.rss_kib() if alive else -1
    return ProbeReport(vfio, qmp, registers, fds_before, fds_after, rss_before, rss_after, left,
                       alive, service.log_text().count("Traceback"), time.monotonic() - start)
