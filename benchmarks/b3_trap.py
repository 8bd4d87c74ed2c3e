"""B3: trap round trip — µs per guest read of an SMMU ID register (IDR0).

A hand-assembled static program (:mod:`benchmarks.a64`) in the guest maps the
register page through ``/dev/mem`` and times a tight loop of 32-bit loads,
then the same loop over an anonymous RAM page; per read = (MMIO - RAM) / N.
It runs against

* **ours**: IDR0 in BAR 0 of our vSMMU function (vfio-user REGION_READ to
  the service for every load), in the e2e recipe's guest;
* **QEMU's**: IDR0 of ``virt,iommu=smmuv3`` at 0x09050000 (in-process MMIO);
* **floor**: on the host, in the same run, a minimal echo over a unix socket
  pair between two processes with the message sizes of a vfio-user
  REGION_READ of 4 bytes (request = header + offset/region/count; reply =
  the same + the data);
* **service alone**: the floor's blocking client speaking vfio-user to a
  ``vsmmu serve`` of its own (:class:`ServiceProbe`): what the service adds
  to the floor, without QEMU or a guest.

Every round starts the service and boots both guests and, with all up, runs
the QEMU probe, our probe, the floor and the service alone once each, in an
order rotated per round (:func:`benchmarks.report.round_order`), so host
noise lands on all four.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks import guests
from benchmarks.a64 import RESULT_SIZE, mmio_loop_elf
from benchmarks.report import BenchmarkError, RoundBenchmark, Section, Settings, round_order
from qmp_harness.console import Console, ConsoleError
from qmp_harness.nested import EXPECTED_SMMU_BAR
from vsmmu.arch.registers import Reg
from vsmmu.smmu import SmmuFeatures
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.uapi import HEADER_SIZE, REGION_RW

logger = logging.getLogger(__name__)

REGISTER_BYTES = 4
REQUEST_SIZE = HEADER_SIZE + REGION_RW.size
REPLY_SIZE = REQUEST_SIZE + REGISTER_BYTES
SMMU_BAR = uapi.PciRegion.BAR0
SERVICE_START_TIMEOUT = 30.0
SERVICE_STOP_TIMEOUT = 10.0
SERVICE_REPLY_TIMEOUT = 10.0
SERVICE_POLL_S = 0.02
FLOOR_ROUND_TRIPS = 20_000
QUICK_FLOOR_ROUND_TRIPS = 500
OURS_READS = 15_000
QUICK_OURS_READS = 200
QEMU_READS = 2_000_000
QUICK_QEMU_READS = 5_000
PROBE_PATH = "/bin/bench-mmio"
QEMU_SMMU_BASE_IDR0 = guests.QEMU_SMMU_BASE + Reg.IDR0
RUN_TIMEOUT = 120.0
NS_PER_US = 1000.0
US_PER_S = 1e6
_NUMBER = re.compile(r"\d+")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def socket_floor(round_trips: int) -> float:
    """µs per request/reply round trip over a unix socket pair to a forked echo process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the echo process: reply REPLY_SIZE bytes to every REQUEST_SIZE request
        ours.close()
        reply = bytes(REPLY_SIZE)
        try:
            while len(_recv_exactly(theirs, REQUEST_SIZE)) == REQUEST_SIZE:
                theirs.sendall(reply)
        finally:
            os._exit(0)
    theirs.close()
    request = bytes(REQUEST_SIZE)
    try:
        start = time.perf_counter_ns()
        for _ in range(round_trips):
            ours.sendall(request)
            if len(_recv_exactly(ours, REPLY_SIZE)) != REPLY_SIZE:
                raise BenchmarkError(f"echo process closed the socket, expected a "
                                     f"{REPLY_SIZE}-byte reply")
        elapsed = time.perf_counter_ns() - start
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return elapsed / round_trips / NS_PER_US


class ServiceProbe:
    """``vsmmu serve`` on its own, read over its SMMU socket by a blocking client.

    The client speaks vfio-user as QEMU does (VERSION, then REGION_READ of IDR0
    in BAR 0: the floor's message sizes) from plain blocking sockets, like the
    floor's client, so ``service - floor`` is what the service itself adds to a
    round trip, and ``ours - service`` what QEMU's vfio-user client and the
    guest's trap add.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.msg_id = 0

    def __enter__(self) -> ServiceProbe:
        path = self.workdir / "smmu.sock"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir", str(self.workdir),
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVICE_START_TIMEOUT
            while not path.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"vsmmu serve: no {path} after "
                                         f"{SERVICE_START_TIMEOUT:.0f} s (exit status "
                                         f"{self.proc.returncode}); its log:\n"
                                         f"{self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(SERVICE_POLL_S)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(SERVICE_REPLY_TIMEOUT)
            self.sock.connect(str(path))
            caps = {uapi.CAP_ROOT: {uapi.CAP_MAX_FDS: uapi.SERVER_MAX_FDS,
                                    uapi.CAP_MAX_XFER: uapi.DEFAULT_MAX_XFER}}
            self._call(uapi.Command.VERSION,
                       uapi.VERSION_BODY.pack(uapi.VERSION_MAJOR, uapi.VERSION_MINOR)
                       + json.dumps(caps).encode() + b"\0")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the service (SIGTERM, then SIGKILL after a timeout)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SERVICE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _call(self, command: int, payload: bytes) -> bytes:
        assert self.sock is not None
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        self.sock.sendall(uapi.HEADER.pack(self.msg_id, command, HEADER_SIZE + len(payload),
                                           0, 0) + payload)
        header = _recv_exactly(self.sock, HEADER_SIZE)
        if len(header) != HEADER_SIZE:
            raise BenchmarkError("vsmmu serve closed the SMMU socket, expected a reply")
        msg_id, _command, size, flags, error = uapi.HEADER.unpack(header)
        body = _recv_exactly(self.sock, size - HEADER_SIZE)
        if flags & uapi.MsgFlag.ERROR or msg_id != self.msg_id:
            raise BenchmarkError(f"vsmmu serve replied to command {command} with error "
                                 f"{error} (message id {msg_id}, expected {self.msg_id})")
        return body

    def read_idr0(self) -> int:
        """IDR0 through one REGION_READ."""
        body = self._call(uapi.Command.REGION_READ, REGION_RW.pack(Reg.IDR0, SMMU_BAR, 4))
        return int.from_bytes(body[REGION_RW.size:], "little")

    def round_trips(self, count: int, expected_idr0: int) -> float:
        """µs per REGION_READ round trip over ``count`` reads of IDR0 (first and last
        checked against ``expected_idr0``)."""
        if (value := self.read_idr0()) != expected_idr0:
            raise BenchmarkError(f"vsmmu serve: IDR0 read {value:#x}, expected "
                                 f"{expected_idr0:#x}")
        assert self.sock is not None
        sock = self.sock
        request = uapi.HEADER.pack(0, uapi.Command.REGION_READ, REQUEST_SIZE, 0, 0) \
            + REGION_RW.pack(Reg.IDR0, SMMU_BAR, 4)
        start = time.perf_counter_ns()
        for _ in range(count):
            sock.sendall(request)
            if len(_recv_exactly(sock, REPLY_SIZE)) != REPLY_SIZE:
                raise BenchmarkError("vsmmu serve closed the SMMU socket, expected a "
                                     f"{REPLY_SIZE}-byte reply")
        elapsed = time.perf_counter_ns() - start
        if (value := self.read_idr0()) != expected_idr0:
            raise BenchmarkError(f"vsmmu serve: IDR0 read {value:#x} after the loop, "
                                 f"expected {expected_idr0:#x}")
        return elapsed / count / NS_PER_US


async def run_probe(console: Console, reads: int) -> tuple[float, int]:
    """Run the probe once; return (µs per register read, RAM loop subtracted; value read)."""
    try:
        out, status = await console.run(f"{PROBE_PATH} | od -An -tu8", RUN_TIMEOUT)
    except ConsoleError as exc:
        raise BenchmarkError(f"{PROBE_PATH}: {exc}") from exc
    numbers = [int(n) for n in _NUMBER.findall(out)]
    if status != 0 or len(numbers) != RESULT_SIZE // 8:
        raise BenchmarkError(f"{PROBE_PATH}: status {status}, output {out!r}; expected three "
                             "numbers (MMIO ns, RAM ns, register value)")
    mmio_ns, ram_ns, value = numbers
    if mmio_ns <= ram_ns:
        raise BenchmarkError(f"{PROBE_PATH}: MMIO loop {mmio_ns} ns <= RAM loop {ram_ns} ns, "
                             "expected the register reads to trap")
    return (mmio_ns - ram_ns) / reads / NS_PER_US, value


class TrapBenchmark(RoundBenchmark):
    """B3 (module docstring): per round, both guests booted, then both probes and the floor.

    ``guest=False`` measures the floor and the service alone only (the guest figures
    are reported as not measured).
    """

    ids = ("B3",)

    def __init__(self, settings: Settings, *, guest: bool = True) -> None:
        super().__init__(settings)
        self.guest = guest
        self.ours_reads = QUICK_OURS_READS if settings.quick else OURS_READS
        self.qemu_reads = QUICK_QEMU_READS if settings.quick else QEMU_READS
        self.trips = QUICK_FLOOR_ROUND_TRIPS if settings.quick else FLOOR_ROUND_TRIPS
        self.ours_idr0 = SmmuFeatures().id_registers()[Reg.IDR0]
        self.qemu_fragment = guests.program_fragment(
            "mmio-qemu", PROBE_PATH, mmio_loop_elf(QEMU_SMMU_BASE_IDR0, self.qemu_reads))
        self.ours_fragment = guests.program_fragment(
            "mmio-ours", PROBE_PATH, mmio_loop_elf(EXPECTED_SMMU_BAR + Reg.IDR0,
                                                   self.ours_reads))
        self.floor: list[float] = []
        self.service: list[float] = []
        self.ours: list[float] = []
        self.qemu: list[float] = []
        self.qemu_idr0 = 0

    async def round(self, index: int) -> None:
        """One sample of the floor and the service alone, and (with guests) of both
        probes, in turn."""
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vsmmu-b3-")))
            service = stack.enter_context(ServiceProbe(workdir))

            async def floor_sample() -> None:
                self.floor.append(socket_floor(self.trips))

            async def service_sample() -> None:
                self.service.append(service.round_trips(self.trips, self.ours_idr0))

            if not self.guest:
                for which in round_order(index, 2):
                    await (floor_sample, service_sample)[which]()
                return
            await self._guest_round(index, [floor_sample, service_sample])

    async def _guest_round(self, index: int,
                           host_samplers: list[Callable[[], Awaitable[None]]]) -> None:
        env = guests.environment(self.settings.cache)
        async with contextlib.AsyncExitStack() as stack:
            vm = await stack.enter_async_context(guests.qemu_smmu_guest(
                env, fragments=[self.qemu_fragment], append=[guests.RELAXED_IOMEM]))
            nested = await stack.enter_async_context(guests.our_guest(
                env, fragments=[self.ours_fragment], append=[guests.RELAXED_IOMEM]))

            async def qemu_sample() -> None:
                per_read, value = await run_probe(vm.console, self.qemu_reads)
                if value == 0:
                    raise BenchmarkError("QEMU SMMUv3: IDR0 read 0, expected the SMMU's ID "
                                         "register")
                self.qemu_idr0 = value
                self.qemu.append(per_read)

            async def ours_sample() -> None:
                per_read, value = await run_probe(nested.vm.console, self.ours_reads)
                if value != self.ours_idr0:
                    raise BenchmarkError(f"our vSMMU: IDR0 read {value:#x}, expected "
                                         f"{self.ours_idr0:#x}")
                self.ours.append(per_read)

            samplers = [qemu_sample, ours_sample, *host_samplers]
            for which in round_order(index, len(samplers)):
                await samplers[which]()

    def sections(self) -> list[Section]:
        """The B3 section."""
        section = Section("B3", "trap round trip: guest read of SMMU IDR0")
        floor = section.figure("B3.floor", f"unix socket echo {REQUEST_SIZE} B -> {REPLY_SIZE} "
                               "B (floor)", "µs", self.floor, higher_is_better=False)
        service = section.figure("B3.service", "IDR0 REGION_READ, blocking client -> vsmmu "
                                 "serve (no guest, no QEMU)", "µs", self.service,
                                 higher_is_better=False)
        section.ratio("B3.ratio_service_floor", "service alone / socket floor", service, floor)
        if not self.guest:
            for key, label in (("B3.ours", "IDR0 read, our vSMMU"),
                               ("B3.qemu", "IDR0 read, QEMU SMMUv3")):
                section.missing(key, label, "guest runs skipped (host figures only)")
            return [section]
        ours = section.figure("B3.ours", "IDR0 read, our vSMMU (vfio-user BAR)", "µs", self.ours,
                              higher_is_better=False)
        qemu = section.figure("B3.qemu", "IDR0 read, QEMU SMMUv3 (in-process)", "µs", self.qemu,
                              higher_is_better=False)
        section.ratio("B3.ratio_qemu", "IDR0 read: ours / QEMU", ours, qemu)
        section.ratio("B3.ratio_floor", "IDR0 read: ours / socket floor", ours, floor)
        section.ratio("B3.ratio_service", "IDR0 read: ours / service alone", ours, service)
        section.notes.append(f"tight loop of ldr w over /dev/mem minus the same loop over RAM; "
                             f"QEMU's IDR0 read {self.qemu_idr0:#x}; floor is Python<->Python, "
                             "two processes, blocking sockets; service alone is the floor's client "
                             "speaking vfio-user to vsmmu serve; per round both guests boot, then "
                             "the two probes, the floor and the service alone take turns")
        return [section]
