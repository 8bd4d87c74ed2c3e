"""B1 boot to first verified DMA, B2 disk throughput and B2-hwrng: our vSMMU vs QEMU's SMMUv3.

Both guests boot the same kernel and initramfs tools with ``iommu.strict=1``
(every unmap is invalidated at once, so every request exercises the vIOMMU's
command queue).  Ours is the e2e recipe (:class:`qmp_harness.nested.NestedMachine`:
``vsmmu serve`` + our virtio-rng and our virtio-blk behind our vSMMU); QEMU's is
``virt,iommu=smmuv3`` with its own ``virtio-rng-pci`` and ``virtio-blk-pci``
(``iommu_platform=on``).  Both disks are the same raw image file.

* **B1**: seconds from the start of the boot (for ours: the service start,
  the DT dump and QEMU) to the guest shell, where ``/init`` has waited for
  the virtio rng to become the current hwrng and read :data:`FIRST_READ`
  bytes from ``/dev/hwrng`` (checked: the count printed must be complete).
  One boot per sample.
* **B2**: MB/s of sequential ``O_DIRECT`` writes, then reads, of
  :data:`DISK_BYTES` in :data:`DISK_BLOCK` blocks (``dd``) on the guest's
  virtio-blk disk in that same boot, timed on the host around the console
  command minus an empty command's round trip; one write and one read sample
  per boot.  For ours also the CMD_SYNCs per MiB each transfer cost (the
  service's ``query-vsmmu``): one per strict unmap the guest waited for, so
  it says how fragmented the guest's ``dd`` buffer was (a physically
  contiguous run of pages is one DMA mapping, one unmap) — the figure that
  moves our samples most.
* **B2-hwrng**: MB/s of ``head -c N /dev/hwrng`` in that boot, timed the
  same way; :data:`READS_PER_BOOT` samples per boot.

Each round boots both guests one after the other, which one first rotating
from round to round (:func:`benchmarks.report.round_order`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

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
MIB = 1024 * 1024
DISK_BYTES, QUICK_DISK_BYTES = 64 * MIB, 8 * MIB
DISK_BLOCK = MIB
DISK_WAIT_POLLS = 600

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


async def disk_device(console: Console, who: str) -> str:
    """The ``/dev`` node of the virtio-blk disk at :func:`guests.disk_bdf`, once it exists."""
    block = f"/sys/bus/pci/devices/{guests.disk_bdf()}/virtio*/block"
    try:
        out, status = await console.run(
            f"i=0; until [ -b /dev/$(ls {block} 2>/dev/null) ]; do i=$((i+1)); "
            f"[ $i -gt {DISK_WAIT_POLLS} ] && exit 1; sleep 0.05; done; ls {block}", RUN_TIMEOUT)
    except ConsoleError as exc:
        raise BenchmarkError(f"{who}: waiting for the virtio-blk disk: {exc}") from exc
    if status != 0 or not out.strip():
        raise BenchmarkError(f"{who}: no virtio-blk disk at {guests.disk_bdf()} ({out.strip()!r})")
    return "/dev/" + out.strip().split()[0]


async def disk_throughput(console: Console, device: str, size: int, *, write: bool,
                          who: str) -> float:
    """MB/s of a sequential O_DIRECT write or read of ``size`` bytes in DISK_BLOCK blocks."""
    count = size // DISK_BLOCK
    if write:
        command = f"dd if=/dev/zero of={device} bs={DISK_BLOCK} count={count} oflag=direct"
    else:
        command = f"dd if={device} of=/dev/null bs={DISK_BLOCK} count={count} iflag=direct"
    try:
        start = time.perf_counter()
        await console.run("true", RUN_TIMEOUT)
        empty = time.perf_counter() - start
        start = time.perf_counter()
        out, status = await console.run(f"{command} 2>&1", RUN_TIMEOUT)
        elapsed = time.perf_counter() - start - empty
    except ConsoleError as exc:
        raise BenchmarkError(f"{who}: {command}: {exc}") from exc
    if status != 0 or f"{count}+0 records out" not in out:
        raise BenchmarkError(f"{who}: {command} gave {out.strip()!r} (status {status})")
    return size / BYTES_PER_MB / max(elapsed, 1e-6)


class DmaBenchmark(RoundBenchmark):
    """B1, B2 and B2-hwrng (module docstring): per round, one boot of each guest, in turn."""

    ids = ("B1", "B2", "B2-hwrng")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.env = guests.environment(settings.cache)
        self.ours_bytes = QUICK_OURS_BYTES if settings.quick else OURS_BYTES
        self.qemu_bytes = QUICK_QEMU_BYTES if settings.quick else QEMU_BYTES
        self.disk_bytes = QUICK_DISK_BYTES if settings.quick else DISK_BYTES
        self.reads = 1 if settings.quick else READS_PER_BOOT
        self.samples: dict[str, list[float]] = {
            f"{figure}_{side}": [] for figure in ("b1", "hwrng", "write", "read")
            for side in SIDES}
        self.samples.update({f"syncs_{direction}": [] for direction in ("write", "read")})
        # One raw image for both guests, removed with this object.
        handle, name = tempfile.mkstemp(prefix="vsmmu-bench-disk-", suffix=".raw")
        os.ftruncate(handle, self.disk_bytes)
        os.close(handle)
        self.disk = Path(name)
        weakref.finalize(self, self.disk.unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def _booted(self, side: str
                      ) -> AsyncIterator[tuple[Console, Callable[[], Awaitable[int]] | None]]:
        """The console of ``side``'s guest ("qemu" or "ours"), booted to its shell, and for
        ours a coroutine function giving the CMD_SYNC MSIs the service has written."""
        if side == "qemu":
            async with guests.qemu_smmu_guest(self.env, fragments=[FIRST_DMA],
                                              append=[STRICT], disk=self.disk) as vm:
                yield vm.console, None
        else:
            async with guests.our_guest(self.env, fragments=[FIRST_DMA],
                                        append=[STRICT], disk=self.disk) as nested:

                async def sync_msis() -> int:
                    state = await nested.service("query-vsmmu")
                    return int(state["cmdq"]["sync-msis"])

                yield nested.vm.console, sync_msis

    async def _boot(self, side: str) -> None:
        """One B1 sample (the boot), one B2 write and read, :data:`READS_PER_BOOT` B2-hwrng."""
        who = SIDES[side]
        start = time.perf_counter()
        async with self._booted(side) as (console, sync_msis):
            self.samples[f"b1_{side}"].append(time.perf_counter() - start)
            check_first_dma(console, who)
            device = await disk_device(console, who)
            for direction in ("write", "read"):
                before = await sync_msis() if sync_msis is not None else 0
                self.samples[f"{direction}_{side}"].append(await disk_throughput(
                    console, device, self.disk_bytes, write=direction == "write", who=who))
                if sync_msis is not None:
                    syncs = await sync_msis() - before
                    self.samples[f"syncs_{direction}"].append(syncs / (self.disk_bytes / MIB))
            size = self.qemu_bytes if side == "qemu" else self.ours_bytes
            for _ in range(self.reads):
                self.samples[f"hwrng_{side}"].append(await throughput(console, size, who))

    async def round(self, index: int) -> None:
        """Boot both guests, one after the other (which first rotates)."""
        sides = list(SIDES)
        for which in round_order(index, len(sides)):
            await self._boot(sides[which])

    def sections(self) -> list[Section]:
        """The B1, B2 and B2-hwrng sections (they share the boots)."""
        samples = self.samples
        b1 = Section("B1", f"boot to first verified /dev/hwrng read ({STRICT})")
        ours = b1.figure("B1.ours", "boot to first DMA, our vSMMU + our virtio-rng", "s",
                         samples["b1_ours"], higher_is_better=False)
        qemu = b1.figure("B1.qemu", "boot to first DMA, QEMU SMMUv3 + virtio-rng-pci", "s",
                         samples["b1_qemu"], higher_is_better=False)
        b1.ratio("B1.ratio", "boot to first DMA: ours / QEMU", ours, qemu)
        b1.notes.append("ours includes starting vsmmu serve and dumping/patching the DT")
        mib = self.disk_bytes // MIB
        b2 = Section("B2", f"virtio-blk sequential O_DIRECT throughput, {mib} MiB in "
                           f"{DISK_BLOCK // MIB} MiB blocks ({STRICT})")
        for direction in ("write", "read"):
            ours = b2.figure(f"B2.{direction}_ours", f"{direction}, our vSMMU + our virtio-blk",
                             "MB/s", samples[f"{direction}_ours"], higher_is_better=True)
            qemu = b2.figure(f"B2.{direction}_qemu",
                             f"{direction}, QEMU SMMUv3 + virtio-blk-pci", "MB/s",
                             samples[f"{direction}_qemu"], higher_is_better=True)
            b2.ratio(f"B2.{direction}_ratio", f"{direction} MB/s: ours / QEMU", ours, qemu)
        for direction in ("write", "read"):
            b2.figure(f"B2.{direction}_syncs", f"{direction}, ours: CMD_SYNCs the guest waited "
                      "for, per MiB", "per MiB", samples[f"syncs_{direction}"],
                      higher_is_better=False)
        b2.notes.append("dd bs=1M oflag/iflag=direct on the same raw image file (QEMU: "
                        "-blockdev raw, its default cache); one write then one read per boot")
        b2.notes.append("CMD_SYNCs per MiB: one per strict unmap, i.e. per physically "
                        "contiguous run of the dd buffer (about 256 when every page is apart, "
                        "about 20 when runs are long); the service round trip each costs is "
                        "most of ours' time, so samples move with it")
        hw = Section("B2-hwrng", f"/dev/hwrng throughput through the vIOMMU ({STRICT})")
        ours = hw.figure("B2-hwrng.ours", "hwrng read, our vSMMU + our virtio-rng", "MB/s",
                         samples["hwrng_ours"], higher_is_better=True)
        qemu = hw.figure("B2-hwrng.qemu", "hwrng read, QEMU SMMUv3 + virtio-rng-pci", "MB/s",
                         samples["hwrng_qemu"], higher_is_better=True)
        hw.ratio("B2-hwrng.ratio", "hwrng MB/s: ours / QEMU", ours, qemu)
        hw.notes.append(f"{self.reads} read(s) of /dev/hwrng per boot, each a sample")
        return [b1, b2, hw]
