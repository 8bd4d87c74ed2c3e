"""B5: translation throughput of the sim backend (the physical SMMU it plays).

A nested setup as the translator builds it (IOAS over guest RAM, S2
nest-parent HWPT, vIOMMU, vDEVICE, nested HWPT from an S1-translate vSTE)
with a 48-bit, 4 KiB-granule, 4-level stage-1 table mapping :data:`PAGES`
consecutive pages.  Measured with :meth:`SimIommufd.dma_read`:

* **hits**: reads of pages already in the IOTLB, cycling over every page;
* **misses**: the IOTLB is flushed (TLBI_NH_ALL, untimed), then every page is
  read once — each read is a full 4-level walk (the sim's walk counter is
  checked to prove it).

Baseline in the same run: a plain ``memoryview`` slice copy of the same size
out of the same RAM, i.e. what a translation-free device model would pay.
Hits, misses and copies are sampled in turn, round by round
(:func:`benchmarks.report.sample_round`).
"""

from __future__ import annotations

import logging
import mmap
import time
from functools import partial

from benchmarks.report import BenchmarkError, RoundBenchmark, Section, Settings, sample_round
from vsmmu.arch.cd import CD, Tg0
from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.arch.pagetables import DESC, Ap
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import DmaFault, HostMapping
from vsmmu.iommufd.sim import SimIommufd

logger = logging.getLogger(__name__)

RAM_IPA = 0x4000_0000
RAM_SIZE = 8 << 20
PSID, VSID, ASID = 0x1000, 0x21, 7
IPS_48, T0SZ_48 = 5, 16
IOVA_BASE = 0x12_3400_0000
PAGE_SIZE = 0x1000
PAGES = 512
"""One full last-level table: every miss walks all four levels."""
DATA_OFFSET = 0x20_0000
LEVELS = 4
LEVEL_BITS = 9
INDEX_MASK = (1 << LEVEL_BITS) - 1
TOP_LEVEL_SHIFT = 39
PAGE_SHIFT = 12
DESCRIPTOR_SIZE = 8
SIZES = (8, 4096)
QUICK_SIZES = (8,)
HIT_READS = 200_000
QUICK_HIT_READS = 5_000
MISS_PASSES = 8
QUICK_MISS_PASSES = 1


class NestedTable:
    """The sim with one device translating ``PAGES`` IOVAs through a 4-level S1 table."""

    def __init__(self) -> None:
        self.sim = SimIommufd()
        self.ram = mmap.mmap(-1, RAM_SIZE)  # page-aligned, as an IOAS with a domain wants
        self.dev = self.sim.create_mock_device(PSID, name="bench-ep")
        ioas = self.sim.ioas_alloc()
        self.sim.ioas_map(ioas, HostMapping(self.ram), iova=RAM_IPA)
        s2 = self.sim.hwpt_alloc(self.dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
        self.viommu = self.sim.viommu_alloc(self.dev, s2)
        self.sim.vdevice_alloc(self.viommu, self.dev, VSID)
        cd_ipa, ttb = RAM_IPA, RAM_IPA + 0x10000
        w0 = CD.V.put(0, 1)
        w0 = CD.AA64.put(w0, 1)
        w0 = CD.T0SZ.put(w0, T0SZ_48)
        w0 = CD.TG0.put(w0, Tg0.GRANULE_4K)
        w0 = CD.EPD1.put(w0, 1)
        w0 = CD.IPS.put(w0, IPS_48)
        w0 = CD.ASID.put(w0, ASID)
        self._put(cd_ipa, w0)
        self._put(cd_ipa + DESCRIPTOR_SIZE, CD.TTB0.put(0, ttb))
        tables = [ttb + i * PAGE_SIZE for i in range(LEVELS)]
        table_bits = DESC.VALID.place(1) | DESC.TYPE.place(1)
        for level in range(LEVELS - 1):
            index = self._index(IOVA_BASE, level)
            self._put(tables[level] + index * DESCRIPTOR_SIZE, tables[level + 1] | table_bits)
        leaf = DESC.VALID.place(1) | DESC.AF.place(1) | DESC.AP.place(Ap.RW_ANY) \
            | DESC.TYPE.place(1)
        self.iovas = [IOVA_BASE + i * PAGE_SIZE for i in range(PAGES)]
        for i, iova in enumerate(self.iovas):
            out = RAM_IPA + DATA_OFFSET + i * PAGE_SIZE
            self._put(tables[LEVELS - 1] + self._index(iova, LEVELS - 1) * DESCRIPTOR_SIZE,
                      out | leaf)
        ste0 = STE.S1CONTEXTPTR.put(STE.CONFIG.put(STE.V.put(0, 1), SteConfig.S1_TRANS), cd_ipa)
        hwpt = self.sim.hwpt_alloc(self.dev, self.viommu, data=(ste0, 0))
        self.sim.device_attach(self.dev, hwpt)
        self.flush = (CMD.OPCODE.put(0, CmdOpcode.TLBI_NH_ALL), 0)
        for i in range(PAGES):
            self.ram[DATA_OFFSET + i * PAGE_SIZE] = i & 0xFF

    @staticmethod
    def _index(iova: int, level: int) -> int:
        return (iova >> (TOP_LEVEL_SHIFT - LEVEL_BITS * level)) & INDEX_MASK

    def _put(self, ipa: int, value: int) -> None:
        off = ipa - RAM_IPA
        self.ram[off:off + DESCRIPTOR_SIZE] = value.to_bytes(DESCRIPTOR_SIZE, "little")

    def check(self) -> None:
        """Raise BenchmarkError unless every page reads back its marker byte."""
        for i, iova in enumerate(self.iovas):
            try:
                got = self.sim.dma_read(self.dev, iova, 1)
            except DmaFault as exc:
                raise BenchmarkError(f"dma_read at IOVA {iova:#x} faulted ({exc}), expected "
                                     "a translation") from exc
            if got != bytes([i & 0xFF]):
                raise BenchmarkError(f"dma_read at IOVA {iova:#x} returned {got!r}, "
                                     f"expected {bytes([i & 0xFF])!r}")

    def hits(self, size: int, reads: int) -> float:
        """Translations/s for ``reads`` IOTLB-hit reads of ``size`` bytes."""
        sim, dev, iovas = self.sim, self.dev, self.iovas
        for iova in iovas:
            sim.dma_read(dev, iova, size)
        walks = sim.smmu.walks
        passes, rest = divmod(reads, PAGES)
        start = time.perf_counter_ns()
        for _ in range(passes):
            for iova in iovas:
                sim.dma_read(dev, iova, size)
        for iova in iovas[:rest]:
            sim.dma_read(dev, iova, size)
        elapsed = time.perf_counter_ns() - start
        if sim.smmu.walks != walks:
            raise BenchmarkError(f"{sim.smmu.walks - walks} walks during IOTLB-hit reads, "
                                 "expected 0")
        return reads / (elapsed / 1e9)

    def misses(self, size: int, passes: int) -> float:
        """Translations/s for reads that each miss the IOTLB and walk 4 levels."""
        sim, dev, iovas = self.sim, self.dev, self.iovas
        elapsed = 0
        walks = sim.smmu.walks
        for _ in range(passes):
            if sim.hwpt_invalidate(self.viommu, [self.flush]) != 1:
                raise BenchmarkError("TLBI_NH_ALL not accepted by the sim, expected 1 handled")
            start = time.perf_counter_ns()
            for iova in iovas:
                sim.dma_read(dev, iova, size)
            elapsed += time.perf_counter_ns() - start
        reads = passes * PAGES
        if sim.smmu.walks - walks != reads:
            raise BenchmarkError(f"{sim.smmu.walks - walks} walks for {reads} reads after a "
                                 "flush, expected one each")
        return reads / (elapsed / 1e9)

    def memcpy(self, size: int, reads: int) -> float:
        """Copies/s of ``size`` bytes out of the same RAM through a memoryview (baseline)."""
        view = memoryview(self.ram)
        offsets = [DATA_OFFSET + i * PAGE_SIZE for i in range(PAGES)]
        passes, rest = divmod(reads, PAGES)
        start = time.perf_counter_ns()
        for _ in range(passes):
            for off in offsets:
                view[off:off + size].tobytes()
        for off in offsets[:rest]:
            view[off:off + size].tobytes()
        elapsed = time.perf_counter_ns() - start
        return reads / (elapsed / 1e9)


FIGURES = ("hit", "miss", "copy")


class TranslationBenchmark(RoundBenchmark):
    """B5 (module docstring): per round and size, a hit, a miss and a copy sample in turn."""

    ids = ("B5",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.table = NestedTable()
        self.table.check()
        self.sizes = QUICK_SIZES if settings.quick else SIZES
        self.reads = QUICK_HIT_READS if settings.quick else HIT_READS
        self.passes = QUICK_MISS_PASSES if settings.quick else MISS_PASSES
        self.samples: dict[tuple[str, int], list[float]] = {
            (figure, size): [] for figure in FIGURES for size in self.sizes}

    async def round(self, index: int) -> None:
        """One sample of every figure."""
        table = self.table
        for size in self.sizes:
            taken = sample_round(self.settings, index, [
                partial(table.hits, size, self.reads), partial(table.misses, size, self.passes),
                partial(table.memcpy, size, self.reads)])
            for figure, value in zip(FIGURES, taken, strict=True):
                self.samples[figure, size].append(value)

    def sections(self) -> list[Section]:
        """The B5 section."""
        section = Section("B5", "sim translation throughput (nested, 4-level 4K S1)")
        for size in self.sizes:
            hit = section.figure(f"B5.hit_{size}", f"IOTLB hit, dma_read {size} B",
                                 "translations/s", self.samples["hit", size],
                                 higher_is_better=True)
            miss = section.figure(f"B5.miss_{size}",
                                  f"IOTLB miss (4-level walk), dma_read {size} B",
                                  "translations/s", self.samples["miss", size],
                                  higher_is_better=True)
            copy = section.figure(f"B5.copy_{size}", f"memoryview copy {size} B (baseline)",
                                  "copies/s", self.samples["copy", size], higher_is_better=True)
            section.ratio(f"B5.hit_{size}_ratio", f"hit {size} B / memoryview copy", hit, copy)
            section.ratio(f"B5.miss_{size}_ratio", f"miss {size} B / memoryview copy", miss,
                          copy)
        section.notes.append(f"{PAGES} pages of one last-level table; misses follow an untimed "
                             "TLBI_NH_ALL and are checked to walk once per read")
        return [section]
