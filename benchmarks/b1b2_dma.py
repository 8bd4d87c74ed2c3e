"""B1 boot to first verified DMA and B2 DMA throughput: our vSMMU vs QEMU's SMMUv3.

Both guests boot the same kernel and initramfs tools with ``iommu.strict=1``
(every unmap is invalidated at once, so every request exercises the vIOMMU's
command queue).  Ours is the e2e recipe (:class:`qmp_harness.nested.NestedMachine`:
``vsmmu serve`` + our virtio-rng behind our vSMMU); QEMU's is
``virt,iommu=smmuv3`` with its own ``virtio-rng-pci`` (``iommu_platform=on``).

* **B1**: seconds from the start of the boot (for ours: the service start,
  the DT dump and QEMU) to the guest shell, where ``/init`` has waited for
  the virtio rng to become the current hwrng and read :data:`FIRST_READ`
  bytes from ``/dev/hwrng`` (checked: the count printed must be complete).
  One boot per sample.
* **B2**: MB/s of ``head -c N /dev/hwrng`` in that same boot, timed on the
  host around the console command minus an empty command's round trip;
  :data:`READS_PER_BOOT` samples per boot.

Each round boots both guests one after the other, which one first rotating
from round to round (:func:`benchmarks.report.round_order`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator

from benchmarks import guests
from benchmarks.report import BenchmarkError, RoundBenchmark, Section, Settings, round_order
from guest_images.initramfs import InitFragment
from qmp_harness.console import Console, ConsoleError

logger = logging.getLogger(__name__)

STRICT = "iommu.strict=1"
FIRST_READ = 4096
FIRST_DMA_MARKER = "VSMMU-BENCH-FIRST-DMA"
HWRNG_WAIT_POLLS = 600
HWRNG_POLL_S = 0.05
OURS_BYTES, QEMU_BYTES = 128 * 1024, 1024 * 1024
QUICK_OURS_BYTES, QUICK_QEMU_BYTES = 16 * 1024, 256 * 1024
SIDES = {"qemu": "QEMU SMMUv3 guest", "ours": "vSMMU guest"}
"""The two guests compared, by the key their samples are kept under."""
READS_PER_BOOT = 3
"""B2 samples per boot (one with --quick): the median of more, shorter-spaced samples
moved less from run to run than one read per boot."""
RUN_TIMEOUT = 240.0
BYTES_PER_MB = 1e6

FIRST_DMA = InitFragment("bench-first-dma", f"""\
i=0
until grep -q virtio_rng /sys/class/misc/hw_random/rng_current 2>/dev/null; do
  [ $i -ge {HWRNG_WAIT_POLLS} ] && break
  sleep {HWRNG_POLL_S}; i=$((i+1))
done
echo "{FIRST_DMA_MARKER} $(head -c {FIRST_READ} /dev/hwrng | wc -c)"
""")


def check_first_dma(console: Console, who: str) -> None:
    """Raise BenchmarkError unless ``/init`` read all of :data:`FIRST_READ` from the rng."""
    match = re.search(rf"{FIRST_DMA_MARKER} (\d+)", console.transcript)
    if match is None or int(match.group(1)) != FIRST_READ:
        got = match.group(1) if match else "no marker"
        raise BenchmarkError(f"{who}: first /dev/hwrng read gave {got}, expected {FIRST_READ} "
                             f"bytes\n{console.tail()}")


async def throughput(console: Console, size: int, who: str) -> float:
    """MB/s of reading ``size`` bytes from /dev/hwrng (console overhead subtracted)."""
    try:
        start = time.perf_counter()
        await console.run("true", RUN_TIMEOUT)
        empty = time.perf_counter() - start
        start = time.perf_counter()
        out, status = await console.run(f"head -c {size} /dev/hwrng | wc -c", RUN_TIMEOUT)
        elapsed = time.perf_counter() - start - empty
    except ConsoleError as exc:
        raise BenchmarkError(f"{who}: reading {size} bytes of /dev/hwrng: {exc}") from exc
    if status != 0 or out.strip() != str(size):
        raise BenchmarkError(f"{who}: read {out.strip()!r} bytes (status {status}), expected "
                             f"{size}")
    return size / BYTES_PER_MB / max(elapsed, 1e-6)


class DmaBenchmark(RoundBenchmark):
    """B1 and B2 (module docstring): per round, one boot of each guest, in turn."""

    ids = ("B1", "B2")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.env = guests.environment(settings.cache)
        self.ours_bytes = QUICK_OURS_BYTES if settings.quick else OURS_BYTES
        self.qemu_bytes = QUICK_QEMU_BYTES if settings.quick else QEMU_BYTES
        self.reads = 1 if settings.quick else READS_PER_BOOT
        self.samples: dict[str, list[float]] = {
            "b1_ours": [], "b1_qemu": [], "b2_ours": [], "b2_qemu": []}

    @contextlib.asynccontextmanager
    async def _booted(self, side: str) -> AsyncIterator[Console]:
        """The console of ``side``'s guest ("qemu" or "ours"), booted to its shell."""
        if side == "qemu":
            async with guests.qemu_smmu_guest(self.env, fragments=[FIRST_DMA],
                                              append=[STRICT]) as vm:
                yield vm.console
        else:
            async with guests.our_guest(self.env, fragments=[FIRST_DMA],
                                        append=[STRICT]) as nested:
                yield nested.vm.console

    async def _boot(self, side: str) -> None:
        """One B1 sample (the boot) and :data:`READS_PER_BOOT` B2 samples of ``side``."""
        who = SIDES[side]
        start = time.perf_counter()
        async with self._booted(side) as console:
            self.samples[f"b1_{side}"].append(time.perf_counter() - start)
            check_first_dma(console, who)
            size = self.qemu_bytes if side == "qemu" else self.ours_bytes
            for _ in range(self.reads):
                self.samples[f"b2_{side}"].append(await throughput(console, size, who))

    async def round(self, index: int) -> None:
        """Boot both guests, one after the other (which first rotates)."""
        sides = list(SIDES)
        for which in round_order(index, len(sides)):
            await self._boot(sides[which])

    def sections(self) -> list[Section]:
        """The B1 and B2 sections (they share the boots)."""
        samples = self.samples
        b1 = Section("B1", f"boot to first verified /dev/hwrng read ({STRICT})")
        ours = b1.figure("B1.ours", "boot to first DMA, our vSMMU + our virtio-rng", "s",
                         samples["b1_ours"], higher_is_better=False)
        qemu = b1.figure("B1.qemu", "boot to first DMA, QEMU SMMUv3 + virtio-rng-pci", "s",
                         samples["b1_qemu"], higher_is_better=False)
        b1.ratio("B1.ratio", "boot to first DMA: ours / QEMU", ours, qemu)
        b1.notes.append("ours includes starting vsmmu serve and dumping/patching the DT")
        b2 = Section("B2", f"/dev/hwrng throughput through the vIOMMU ({STRICT})")
        ours = b2.figure("B2.ours", "hwrng read, our vSMMU + our virtio-rng", "MB/s",
                         samples["b2_ours"], higher_is_better=True)
        qemu = b2.figure("B2.qemu", "hwrng read, QEMU SMMUv3 + virtio-rng-pci", "MB/s",
                         samples["b2_qemu"], higher_is_better=True)
        b2.ratio("B2.ratio", "hwrng MB/s: ours / QEMU", ours, qemu)
        b2.notes.append(f"{self.reads} read(s) of /dev/hwrng per boot, each a sample")
        return [b1, b2]
