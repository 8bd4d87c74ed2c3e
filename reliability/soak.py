"""``make soak``: a real guest keeps DMA-ing through the vSMMU while the service is attacked.

One ``vsmmu serve`` (sim backend) runs for the whole soak with two
endpoints: the guest's virtio-rng, and a second virtio-rng (``fuzz0``) that
no VMM attaches, whose socket the vfio-user fuzzer owns.  The soak repeats a
cycle until its time is up:

1. boot the stock Debian guest under QEMU against the running service (now
   and then QEMU is SIGKILLed in the middle of booting first, and booted
   again);
2. for ``kill_every_s`` seconds, at once: the guest reads ``/dev/hwrng``
   (64 KiB at a time, every byte DMA'd by the endpoint through the nested
   vSMMU) and each read is checked against the endpoint's seeded stream;
   the vfio-user wire fuzzer hits ``fuzz0``; the QMP fuzzer hits the
   service's monitor (never rewriting a live guest's STEs);
3. SIGKILL QEMU while a read is in flight;
4. while no VMM is attached, a hostile guest takes the SMMU function and
   writes random register values with garbage in its RAM; then the service
   must answer QMP and hold no guest object.

Every :data:`REPORT_EVERY_S` it prints bytes checked, errors, restarts,
probe counts and the service's descriptor count and RSS; at the end a
summary, the fd/RSS series and a verdict.  It fails (exit 1) on any crash,
hung request, data error or leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from guest_images.kernel import GuestKernel
from qmp_harness.nested import NestedBootError, NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.provision import QemuInstall
from reliability.probes import (
    REPLY_TIMEOUT_S,
    ProbeStats,
    ProcessMeter,
    hostile_register_fuzz,
    qmp_wire_fuzz,
    vfio_user_wire_fuzz,
)
from vsmmu.demo import DmaCheckError, check_hwrng_sample

SOAK_SEED = 0x50A6
FUZZ_ENDPOINT = "fuzz0"
FUZZ_SID = 0x200
#: Small enough that a read completes between kills on a loaded machine (the guest shell
#: hashes every 4 KiB block).
READ_BYTES = 64 * 1024
REPORT_EVERY_S = 30.0
#: Probe work per round, then a pause: the fuzzers must not starve the guest of CPU.
VFIO_MESSAGES_PER_ROUND = 500
QMP_MESSAGES_PER_ROUND = 100
REGISTER_WRITES_PER_WINDOW = 4000
PROBE_PAUSE_S = 1.0
#: Every this many cycles, QEMU is also killed in the middle of a boot.
KILL_DURING_BOOT_EVERY = 3
TEARDOWN_TIMEOUT_S = 20.0
#: A boot that fails (a loaded machine can miss the boot timeout) is tried again.
BOOT_ATTEMPTS = 3
SERVICE_OWN_OBJECTS = frozenset({"ioas", "device", "hwpt_paging"})
#: Growth from the first to the last quiet-point sample that still counts as flat.
FD_SLACK = 2
RSS_SLACK_KIB = 24 * 1024


class SoakFailure(Exception):
    """The service crashed, hung or leaked (the soak stops at once)."""


@dataclasses.dataclass
class SoakTotals:
    """Everything the soak counts."""

    bytes_checked: int = 0
    reads_checked: int = 0
    data_errors: int = 0
    guest_errors: int = 0
    hung: int = 0
    crashes: int = 0
    leaks: int = 0
    boots: int = 0
    kills_running: int = 0
    kills_booting: int = 0
    boot_failures: int = 0
    vfio: ProbeStats = dataclasses.field(default_factory=ProbeStats)
    qmp: ProbeStats = dataclasses.field(default_factory=ProbeStats)
    registers: ProbeStats = dataclasses.field(default_factory=ProbeStats)
    #: ``(minutes, fds, rss KiB)`` every report, and at every quiet point (no VMM).
    samples: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)
    quiet: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def kills(self) -> int:
        """QEMU SIGKILLs, running and booting."""
        return self.kills_running + self.kills_booting

    @property
    def hung_total(self) -> int:
        """Hung requests seen by the soak itself and by every probe."""
        return self.hung + self.vfio.hung + self.qmp.hung + self.registers.hung


class Soak:
    """One soak run (module docstring)."""

    def __init__(self, qemu: QemuInstall, guest: GuestKernel, cache: Path, *,
                 minutes: float, kill_every_s: float, out: TextIO = sys.stdout) -> None:
        self.qemu = qemu
        self.guest = guest
        self.cache = cache
        self.minutes = minutes
        self.kill_every_s = kill_every_s
        self.out = out
        self.totals = SoakTotals()
        self.rng = random.Random(SOAK_SEED)
        self.endpoint = NestedEndpoint(slot=2, seed=SOAK_SEED)
        self.t0 = time.monotonic()
        self._meter: ProcessMeter | None = None
        self._stream_offset = 0

    # -- output -------------------------------------------------------------

    def elapsed_min(self) -> float:
        """Minutes since the soak started."""
        return (time.monotonic() - self.t0) / 60

    def say(self, text: str) -> None:
        """One progress line."""
        print(f"[{self.elapsed_min():6.2f} min] {text}", file=self.out, flush=True)

    def status_line(self) -> str:
        """The counters as one line."""
        t = self.totals
        fds, rss = self.sample_service()
        return (f"checked {t.bytes_checked / 2**20:.1f} MiB in {t.reads_checked} reads, "
                f"data errors {t.data_errors}, hung {t.hung_total}, crashes {t.crashes}, "
                f"boots {t.boots}, QEMU kills {t.kills}, vfio-user msgs {t.vfio.messages}, "
                f"QMP msgs {t.qmp.messages}, register writes {t.registers.messages}; "
                f"service fds {fds}, RSS {rss / 1024:.1f} MiB")

    def sample_service(self) -> tuple[int, int]:
        """The service's (fds, RSS KiB) now; raises SoakFailure when it is gone."""
        meter = self._meter
        if meter is None:
            return 0, 0
        if not meter.alive():
            self.totals.crashes += 1
            raise SoakFailure(f"the service (pid {meter.pid}) died")
        return meter.fds(), meter.rss_kib()

    # -- the run ------------------------------------------------------------

    async def run(self) -> int:
        """Soak for :attr:`minutes`; print the summary; return the exit status."""
        config = NestedConfig(
            endpoints=(self.endpoint,), append=("iommu.strict=1",),
            service_args=("--endpoint", f"virtio-rng,sid={FUZZ_SID:#x},name={FUZZ_ENDPOINT}"),
        )
        nm = NestedMachine(self.qemu, self.guest, config, cache=self.cache, name="soak")
        deadline = self.t0 + self.minutes * 60
        reporter: asyncio.Task[None] | None = None
        failure: str | None = None
        try:
            self.say(f"soak for {self.minutes:g} min: starting the service and the first guest")
            await nm.start()
            self.totals.boots += 1
            assert nm.service_pid is not None
            self._meter = ProcessMeter(nm.service_pid)
            reporter = asyncio.create_task(self._report_loop())
            cycle = 0
            while time.monotonic() < deadline:
                cycle += 1
                await self._cycle(nm, cycle, deadline)
        except SoakFailure as exc:
            failure = str(exc)
        except NestedBootError as exc:
            self.totals.guest_errors += 1
            failure = f"the guest failed: {exc}"
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError, SoakFailure):
                    await reporter
            if failure is None:
                with contextlib.suppress(SoakFailure):
                    self.totals.quiet.append((self.elapsed_min(), *self.sample_service()))
            log_tail = nm.service_log_tail(30)
            tracebacks = (nm.service_log.read_text(errors="replace").count("Traceback")
                          if nm.service_log.exists() else 0)
            await nm.close()
        return self.summary(failure, tracebacks, log_tail)

    async def _cycle(self, nm: NestedMachine, cycle: int, deadline: float) -> None:
        if cycle > 1:
            if cycle % KILL_DURING_BOOT_EVERY == 0:
                await self._kill_during_boot(nm)
            self.say(f"cycle {cycle}: booting QEMU against the running service")
            await self._boot(nm)
        await nm.wait_endpoint_bound(self.endpoint)
        self._stream_offset = 0  # the endpoint restarts its stream at every reset
        until = min(deadline, time.monotonic() + self.kill_every_s)
        workers = [
            asyncio.create_task(self._dma_loop(nm, until)),
            asyncio.create_task(self._probe_loop(until, self._vfio_round(nm))),
            asyncio.create_task(self._probe_loop(until, self._qmp_round(nm))),
        ]
        try:
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            # Kill QEMU with a guest read in flight, then stop the workers.
            await nm.kill_vm()
            self.totals.kills_running += 1
        finally:
            for worker in workers:
                worker.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
        for result in results:
            if isinstance(result, SoakFailure):
                raise result
        await self._hostile_guest_window(nm)

    async def _boot(self, nm: NestedMachine) -> None:
        """Boot QEMU; a failed boot is retried (and reported) while the service stays up."""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                await nm.boot_vm()
                self.totals.boots += 1
                return
            except NestedBootError as exc:
                self.totals.boot_failures += 1
                first = str(exc).splitlines()[0][:200] if str(exc) else repr(exc)
                self.totals.notes.append(f"boot attempt {attempt} failed: {first}")
                self.say(f"boot attempt {attempt} failed: {first}")
                self.sample_service()
                with contextlib.suppress(Exception):
                    await nm.kill_vm()
                if attempt == BOOT_ATTEMPTS:
                    raise

    async def _kill_during_boot(self, nm: NestedMachine) -> None:
        delay = self.rng.uniform(0.5, 6.0)
        self.say(f"killing QEMU {delay:.1f} s into a boot")
        boot = asyncio.create_task(nm.boot_vm())
        await asyncio.sleep(delay)
        with contextlib.suppress(Exception):
            await nm.kill_vm()
        self.totals.kills_booting += 1
        boot.cancel()
        with contextlib.suppress(BaseException):
            await boot
        await self._wait_no_guest_objects(nm)

    async def _dma_loop(self, nm: NestedMachine, until: float) -> None:
        while time.monotonic() < until:
            try:
                sample = await nm.read_hwrng(READ_BYTES)
            except NestedBootError as exc:
                if time.monotonic() < until - 1:
                    self.totals.guest_errors += 1
                    self.totals.notes.append(f"guest read failed: {str(exc)[:300]}")
                    self.say(f"guest read failed: {str(exc).splitlines()[0][:200]}")
                return
            try:
                check = check_hwrng_sample(SOAK_SEED, sample, self._stream_offset)
            except DmaCheckError as exc:
                self.totals.data_errors += 1
                self.totals.notes.append(f"data error: {exc}")
                self.say(f"DATA ERROR: {exc}")
                self._stream_offset = 0
                continue
            self._stream_offset = check.end
            self.totals.bytes_checked += sample.length
            self.totals.reads_checked += 1

    async def _probe_loop(self, until: float, round_: Callable[[], Awaitable[None]]) -> None:
        while time.monotonic() < until:
            await round_()
            await asyncio.sleep(PROBE_PAUSE_S)

    def _vfio_round(self, nm: NestedMachine) -> Callable[[], Awaitable[None]]:
        path = str(nm.socket_dir / f"{FUZZ_ENDPOINT}.sock")

        async def run() -> None:
            stats = await vfio_user_wire_fuzz(path, VFIO_MESSAGES_PER_ROUND,
                                              self.rng.getrandbits(32))
            self.totals.vfio.add(stats)
            if stats.hung:
                raise SoakFailure(f"{stats.hung} vfio-user requests hung on {path}")
        return run

    def _qmp_round(self, nm: NestedMachine) -> Callable[[], Awaitable[None]]:
        path = str(nm.socket_dir / "qmp.sock")

        async def run() -> None:
            stats = await qmp_wire_fuzz(path, QMP_MESSAGES_PER_ROUND, self.rng.getrandbits(32),
                                        destructive=False)
            self.totals.qmp.add(stats)
            if stats.hung:
                raise SoakFailure(f"{stats.hung} QMP requests hung on {path}")
        return run

    async def _hostile_guest_window(self, nm: NestedMachine) -> None:
        await self._wait_no_guest_objects(nm)
        stats = await hostile_register_fuzz(str(nm.socket_dir / "smmu.sock"),
                                            REGISTER_WRITES_PER_WINDOW, self.rng.getrandbits(32))
        self.totals.registers.add(stats)
        if stats.hung:
            raise SoakFailure(f"{stats.hung} SMMU register reads hung")
        await self._wait_no_guest_objects(nm)
        self.totals.quiet.append((self.elapsed_min(), *self.sample_service()))

    async def _wait_no_guest_objects(self, nm: NestedMachine) -> None:
        """With no VMM attached the service must hold only its own objects."""
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        while True:
            objects = await self._service(nm, "query-vsmmu-iommufd")
            left = {o["type"] for o in objects} - SERVICE_OWN_OBJECTS
            if not left:
                return
            if time.monotonic() > deadline:
                self.totals.leaks += 1
                raise SoakFailure(f"guest objects {sorted(left)} left {TEARDOWN_TIMEOUT_S} s "
                                  "after the VMM went away")
            await asyncio.sleep(0.2)

    async def _service(self, nm: NestedMachine, command: str) -> Any:
        try:
            return await asyncio.wait_for(nm.service(command), REPLY_TIMEOUT_S)
        except TimeoutError:
            self.totals.hung += 1
            self.sample_service()
            raise SoakFailure(f"service QMP {command} got no reply in {REPLY_TIMEOUT_S} s") \
                from None

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            fds, rss = self.sample_service()
            self.totals.samples.append((self.elapsed_min(), fds, rss))
            self.say(self.status_line())

    # -- the verdict ----------------------------------------------------------

    def summary(self, failure: str | None, tracebacks: int, log_tail: str) -> int:
        """Print the summary and the fd/RSS series; return 0 when everything held."""
        t = self.totals
        problems = [failure] if failure else []
        if t.data_errors:
            problems.append(f"{t.data_errors} data errors")
        if t.guest_errors:
            problems.append(f"{t.guest_errors} guest command failures")
        if t.hung_total:
            problems.append(f"{t.hung_total} hung requests")
        if tracebacks:
            problems.append(f"{tracebacks} tracebacks in the service log")
        if len(t.quiet) >= 2:
            (_, fd0, rss0), (_, fd1, rss1) = t.quiet[0], t.quiet[-1]
            if fd1 > fd0 + FD_SLACK:
                problems.append(f"service fds grew {fd0} -> {fd1}")
            if rss1 > rss0 + RSS_SLACK_KIB:
                problems.append(f"service RSS grew {rss0 // 1024} -> {rss1 // 1024} MiB")
        print("\n== soak summary ==", file=self.out)
        print(f"duration:          {self.elapsed_min():.1f} min", file=self.out)
        print(f"bytes checked:     {t.bytes_checked} ({t.bytes_checked / 2**20:.1f} MiB in "
              f"{t.reads_checked} guest reads)", file=self.out)
        print(f"data errors:       {t.data_errors}", file=self.out)
        print(f"guest errors:      {t.guest_errors}", file=self.out)
        print(f"crashes:           {t.crashes}", file=self.out)
        print(f"hung requests:     {t.hung_total}", file=self.out)
        print(f"leaks:             {t.leaks}", file=self.out)
        print(f"QEMU boots:        {t.boots}; kills {t.kills} ({t.kills_running} running, "
              f"{t.kills_booting} booting); failed boots retried {t.boot_failures}",
              file=self.out)
        for name, stats in (("vfio-user fuzz", t.vfio), ("QMP fuzz", t.qmp),
                            ("hostile guest", t.registers)):
            print(f"{name + ':':<19}{stats.messages} messages, {stats.connections} connections,"
                  f" {stats.error_replies} error replies, {stats.dropped_by_server} dropped by "
                  f"the service, p99 reply {stats.percentile(0.99) * 1000:.1f} ms, max "
                  f"{max(stats.latencies_s, default=0.0) * 1000:.1f} ms", file=self.out)
        print(f"tracebacks in log: {tracebacks}", file=self.out)
        print("service fds / RSS at each quiet point (no VMM attached):", file=self.out)
        for minute, fds, rss in t.quiet:
            print(f"  {minute:6.1f} min  fds {fds:4d}  RSS {rss / 1024:7.1f} MiB", file=self.out)
        for note in t.notes[:20]:
            print(f"note: {note}", file=self.out)
        if problems:
            print("service log tail:\n" + log_tail, file=self.out)
            print(f"VERDICT: FAIL — {'; '.join(problems)}", file=self.out, flush=True)
            return 1
        print("VERDICT: PASS — 0 crashes, 0 hung requests, 0 data errors, fds and RSS flat",
              file=self.out, flush=True)
        return 0
