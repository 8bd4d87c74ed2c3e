"""B6: how our costs grow with the work — small (size, figure) tables, read for linearity.

* **CFGI_ALL vs streams**: a Linux-like guest driver
  (:class:`~vsmmu.smmu.guest_driver.GuestDriver`) fills a 2-level stream
  table with N valid stage-1 STEs, each the StreamID of an endpoint the
  translator attached (a sim mock device, nested HWPT built); the timed
  operation is one CMD_CFGI_ALL + CMD_SYNC (one CMDQ_PROD write, one
  CMDQ_CONS read) through model + translator + sim.  Figure: µs per call;
  the ratio is the cost per stream at the largest N over the smallest
  (1 = linear).
* **Service RSS vs endpoints**: ``vsmmu serve`` with N virtio-rng endpoints,
  no QEMU; VmRSS from ``/proc/<pid>/status`` once its sockets are up.  The
  ratio is the RSS per extra endpoint (largest N against 1) over the RSS of
  the service with one.
* **IOTLB-miss cost vs distinct pages**: B5's nested 4-level table; after an
  untimed TLBI_NH_ALL, N distinct pages are read once each (every read a
  full walk, checked).  Figure: µs per miss; the ratio is the per-miss cost
  at the largest N over the smallest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks.b5_translation import NestedTable
from benchmarks.report import BenchmarkError, RoundBenchmark, Section, Settings, sample_round
from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import SyncCs, encode_cfgi_all
from vsmmu.arch.registers import GERROR, Reg
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.nesting import NestingTranslator
from vsmmu.smmu import GuestRam, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

logger = logging.getLogger(__name__)

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
CD_TABLE = RAM_BASE + 0x10_0000
STREAMS = (16, 64, 256, 1024, 4096)
QUICK_STREAMS = (16, 64)
CFGI_CALLS = 5
"""CFGI_ALL calls per sample (the sample is their median)."""
ENDPOINTS = (1, 2, 4, 8, 16)
QUICK_ENDPOINTS = (1, 2)
MISS_PAGES = (1, 8, 64, 512)
QUICK_MISS_PAGES = (1, 8)
MISS_READS = 2048
"""Reads per IOTLB-miss sample at least (several flush-and-read passes for small N)."""
SERVICE_START_TIMEOUT = 60.0
POLL_S = 0.05
KIB = 1024
US_PER_NS = 1e-3


class StreamsRig:
    """An SMMU whose stream table holds ``streams`` valid S1 STEs, each an attached endpoint."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.ram = GuestRam(RAM_BASE, RAM_SIZE)
        sim = SimIommufd()
        self.translator = NestingTranslator(sim)
        self.translator.map_guest_ram(RAM_BASE, HostMapping(self.ram.data))
        self.smmu = SmmuV3(self.ram, self.translator, SmmuFeatures())
        self.translator.bind(self.smmu)
        for sid in range(streams):
            name = f"bench-ep{sid}"
            self.translator.add_endpoint(sid, sim.create_mock_device(sid, name=name), name)
        self.driver = GuestDriver(self.smmu, self.ram)
        self.driver.probe()
        self.driver.reset()
        ste = Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_TABLE).encode()
        for sid in range(streams):
            self.ram.write(self.driver.ste_address(sid), ste)
        self.cfgi_all()  # builds every nested HWPT: untimed
        attached = sum(1 for stream in self.translator.streams() if stream.hwpt is not None)
        if attached != streams:
            raise BenchmarkError(f"{attached} of {streams} streams attached to a nested HWPT "
                                 "after CFGI_ALL")

    def cfgi_all(self) -> int:
        """One CFGI_ALL + CMD_SYNC, as the guest issues it; its time in ns."""
        driver, smmu = self.driver, self.smmu
        sync = encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)
        for command in (encode_cfgi_all(), sync):
            driver.ram.write(driver.cmdq_base + driver.cmdq.index(driver.cmdq_prod) * 16, command)
            driver.cmdq_prod = driver.cmdq.increment(driver.cmdq_prod)
        start = time.perf_counter_ns()
        smmu.write(Reg.CMDQ_PROD, 4, driver.cmdq_prod)
        cons = smmu.read(Reg.CMDQ_CONS, 4)
        elapsed = time.perf_counter_ns() - start
        if cons != driver.cmdq_prod or smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask:
            raise BenchmarkError(f"CFGI_ALL with {self.streams} streams stopped the queue: "
                                 f"CONS={cons:#x}, PROD={driver.cmdq_prod:#x}")
        return elapsed

    def sample(self) -> float:
        """µs per CFGI_ALL + CMD_SYNC (median of :data:`CFGI_CALLS`)."""
        return statistics.median(self.cfgi_all() for _ in range(CFGI_CALLS)) * US_PER_NS


async def service_rss_kib(endpoints: int) -> float:
    """VmRSS (KiB) of ``vsmmu serve`` with ``endpoints`` virtio-rng endpoints, once it is up."""
    with tempfile.TemporaryDirectory(prefix="vsmmu-b6-") as workdir:
        socket_dir = Path(workdir)
        argv = [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir", str(socket_dir),
                "--log-level", "warning"]
        for index in range(endpoints):
            argv += ["--endpoint", f"virtio-rng,sid={index + 1:#x},name=rng{index}"]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            wanted = [socket_dir / "qmp.sock", *(socket_dir / f"rng{i}.sock"
                                                 for i in range(endpoints))]
            deadline = time.monotonic() + SERVICE_START_TIMEOUT
            while not all(path.exists() for path in wanted):
                if process.returncode is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"vsmmu serve with {endpoints} endpoints did not come "
                                         f"up (exit status {process.returncode})")
                await asyncio.sleep(POLL_S)
            return _vm_rss_kib(process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            await process.wait()


def _vm_rss_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    raise BenchmarkError(f"/proc/{pid}/status has no VmRSS line")


def misses_us(table: NestedTable, pages: int) -> float:
    """µs per IOTLB miss when ``pages`` distinct pages are read once after a flush."""
    sim, dev, iovas = table.sim, table.dev, table.iovas[:pages]
    passes = max(1, MISS_READS // pages)
    elapsed = 0
    walks = sim.smmu.walks
    for _ in range(passes):
        if sim.hwpt_invalidate(table.viommu, [table.flush]) != 1:
            raise BenchmarkError("TLBI_NH_ALL not accepted by the sim, expected 1 handled")
        start = time.perf_counter_ns()
        for iova in iovas:
            sim.dma_read(dev, iova, 8)
        elapsed += time.perf_counter_ns() - start
    if sim.smmu.walks - walks != passes * pages:
        raise BenchmarkError(f"{sim.smmu.walks - walks} walks for {passes * pages} reads "
                             "after a flush, expected one each")
    return elapsed * US_PER_NS / (passes * pages)


class ScalingBenchmark(RoundBenchmark):
    """B6 (module docstring): per round, one sample of every size of every table."""

    ids = ("B6",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        quick = settings.quick
        self.streams = QUICK_STREAMS if quick else STREAMS
        self.endpoints = QUICK_ENDPOINTS if quick else ENDPOINTS
        self.pages = QUICK_MISS_PAGES if quick else MISS_PAGES
        started = time.perf_counter()
        self.rigs = {n: StreamsRig(n) for n in self.streams}
        logger.info("B6: stream-table rigs built in %.1f s", time.perf_counter() - started)
        self.table = NestedTable()
        self.table.check()
        self.cfgi: dict[int, list[float]] = {n: [] for n in self.streams}
        self.rss: dict[int, list[float]] = {n: [] for n in self.endpoints}
        self.miss: dict[int, list[float]] = {n: [] for n in self.pages}

    async def round(self, index: int) -> None:
        """One sample of each size: the in-process ones in rotating order, each from a
        collected heap with the GC paused (:func:`sample_round`), then the services."""
        samplers = [*(self.rigs[n].sample for n in self.streams),
                    *(partial(misses_us, self.table, n) for n in self.pages)]
        samples = iter(sample_round(self.settings, index, samplers))
        for n in self.streams:
            self.cfgi[n].append(next(samples))
        for n in self.pages:
            self.miss[n].append(next(samples))
        for n in _rotated(self.endpoints, index):
            self.rss[n].append(await service_rss_kib(n) / KIB)

    def sections(self) -> list[Section]:
        """One B6 section with the three tables."""
        section = Section("B6", "scaling: CFGI_ALL vs streams, service RSS vs endpoints, "
                                "IOTLB-miss cost vs distinct pages")
        cfgi = {n: section.figure(f"B6.cfgi_all_{n}", f"CFGI_ALL+SYNC, {n} streams", "µs",
                                  samples, higher_is_better=False)
                for n, samples in self.cfgi.items()}
        low, high = min(cfgi), max(cfgi)
        if high > low:
            per_stream = {n: section.figure(f"B6.cfgi_all_per_stream_{n}",
                                            f"CFGI_ALL+SYNC per stream, {n} streams", "µs",
                                            [s / n for s in cfgi[n].samples],
                                            higher_is_better=False)
                          for n in (low, high)}
            section.ratio("B6.cfgi_all_growth", f"CFGI_ALL per stream: {high} / {low} streams",
                          per_stream[high], per_stream[low])
        rss = {n: section.figure(f"B6.rss_{n}", f"service RSS, {n} endpoint(s)", "MiB",
                                 samples, higher_is_better=False)
               for n, samples in self.rss.items()}
        low, high = min(rss), max(rss)
        if high > low:
            section.ratio("B6.rss_growth", f"service RSS: {high} / {low} endpoint(s)",
                          rss[high], rss[low])
        miss = {n: section.figure(f"B6.miss_{n}", f"IOTLB miss, {n} distinct page(s)", "µs",
                                  samples, higher_is_better=False)
                for n, samples in self.miss.items()}
        low, high = min(miss), max(miss)
        if high > low:
            section.ratio("B6.miss_growth", f"per-miss cost: {high} / {low} pages",
                          miss[high], miss[low])
        section.notes.append("CFGI_ALL per stream and per-miss ratios near 1 mean linear "
                             "growth; each CFGI_ALL sample is the median of "
                             f"{CFGI_CALLS} calls; RSS of vsmmu serve without QEMU")
        return [section]


def _rotated(sizes: tuple[int, ...], index: int) -> list[int]:
    shift = index % len(sizes)
    return [*sizes[shift:], *sizes[:shift]]

