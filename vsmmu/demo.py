"""``vsmmu demo`` (``make run``): a stock guest boots with the nested vSMMU and does DMA.

The demo starts ``vsmmu serve`` (sim backend) with a virtio-rng endpoint and
a virtio-blk disk (a fresh raw image in a temporary directory), boots the
Debian guest through :class:`qmp_harness.nested.NestedMachine` and shows,
step by step: the guest driver's SMMU probe lines, the endpoint in an IOMMU
group, a DMA check (the SHA-256 of bytes read from ``/dev/hwrng`` in the
guest equals the SHA-256 of the endpoint generator's stream at the same
offset), a disk check (a pattern the guest writes with ``O_DIRECT`` is in
the image file on the host and reads back) and the iommufd objects the
service created, read over its QMP.

:func:`check_hwrng_sample` is the DMA check, shared with the e2e tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qmp_harness.hwrng import locate_in_stream, match_stream_blocks
from qmp_harness.nested import (
    BLK_MODULES,
    VIRTIO_BLK,
    HwrngSample,
    NestedConfig,
    NestedEndpoint,
    NestedMachine,
)

logger = logging.getLogger(__name__)

DEMO_READ_BYTES = 256 * 1024
DEMO_SEED = 0x5EED
DEMO_DISK_BYTES = 64 * 1024 * 1024
DEMO_DISK_WRITE = 1024 * 1024
DEMO_DISK_BLOCK = 64 * 1024
STREAM_LOOKAHEAD = 256 * 1024
"""How far past the last checked byte a new read may start (boot-time and kthread takes)."""


class DmaCheckError(AssertionError):
    """The guest's ``/dev/hwrng`` bytes are not the endpoint's stream, or its disk's
    bytes are not the image file's."""


@dataclasses.dataclass(frozen=True)
class HwrngCheck:
    """Where a guest's sample lies in the stream and what was compared."""

    start: int
    """Stream offset of the sample's first byte."""
    end: int
    """Stream offset after its last byte (including bytes others took in between)."""
    skipped: int
    """Bytes Linux's hwrng fill thread took in the middle (0 when it was stopped)."""
    guest_sha256: str
    expected_sha256: str
    """SHA-256 of the stream bytes the guest should have read (gaps left out)."""


def check_hwrng_sample(seed: int, sample: HwrngSample, search_from: int = 0) -> HwrngCheck:
    """Check every byte of ``sample`` against the stream of ``seed``.

    The sample is located by its first bytes in ``[search_from, search_from +
    length + STREAM_LOOKAHEAD)``; each block digest must match (allowing the
    whole-chunk gaps Linux's own hwrng thread causes); the SHA-256 of the
    whole sample must equal that of the stream bytes it should hold.
    Raises DmaCheckError naming what did not match.
    """
    if sample.length != len(sample.block_digests) * sample.block:
        raise DmaCheckError(f"guest read {sample.length} bytes, expected "
                            f"{len(sample.block_digests)} blocks of {sample.block}")
    limit = search_from + sample.length + STREAM_LOOKAHEAD
    start = locate_in_stream(seed, sample.probe, search_from, limit)
    if start is None:
        raise DmaCheckError(f"the guest's first bytes {sample.probe.hex()} are not in the "
                            f"stream of seed {seed:#x} at offsets [{search_from}, {limit})")
    match = match_stream_blocks(seed, start, sample.block_digests, sample.block)
    if match is None:
        raise DmaCheckError(f"the guest's {sample.length} bytes from stream offset {start} "
                            "differ from the endpoint's stream")
    end = match.block_offsets[-1] + sample.block if match.block_offsets else start
    expected = b"".join(match.block_bytes)
    expected_sha256 = hashlib.sha256(expected).hexdigest()
    if expected_sha256 != sample.sha256_hex():
        raise DmaCheckError(f"sha256 {sample.sha256_hex()} of the guest's read differs "
                            f"from the stream's {expected_sha256}")
    return HwrngCheck(start, end, match.skipped, sample.sha256_hex(), expected_sha256)


class DemoReport:
    """Prints what the demo does, with the elapsed time."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()

    def step(self, text: str) -> None:
        """A new step, e.g. ``booting the guest``."""
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        """An indented line of results."""
        for line in text.splitlines():
            print(f"           {line}", file=self.out, flush=True)


def format_objects(objects: Sequence[Mapping[str, Any]]) -> str:
    """``query-vsmmu-iommufd`` as a small table."""
    rows = []
    for obj in objects:
        detail = ", ".join(f"{k}={v}" for k, v in obj.get("detail", {}).items())
        rows.append(f"{obj['id']:>3}  {obj['type']:<12} users={obj['users']}  {detail}")
    return "\n".join(rows)


async def run_demo(qemu: Any, guest: Any, cache: Path, out: TextIO = sys.stdout) -> int:
    """Boot the guest with the nested vSMMU and show what it does; return 0 on success.

    Raises NestedBootError (with console, service log and QMP events) or
    DmaCheckError when something does not work.
    """
    with tempfile.TemporaryDirectory(prefix="vsmmu-demo-") as scratch:
        image = Path(scratch) / "disk.raw"
        with image.open("wb") as disk:
            disk.truncate(DEMO_DISK_BYTES)
        return await _demo(qemu, guest, cache, image, DemoReport(out))


async def _demo(qemu: Any, guest: Any, cache: Path, image: Path, report: DemoReport) -> int:
    endpoint = NestedEndpoint(slot=2, seed=DEMO_SEED)
    disk = NestedEndpoint(slot=3, kind=VIRTIO_BLK, image=image)
    config = NestedConfig(endpoints=(endpoint, disk), append=("iommu.strict=1",),
                          modules=("virtio_rng", *BLK_MODULES))
    report.step(f"starting `vsmmu serve` (sim backend) with a virtio-rng endpoint at "
                f"{endpoint.bdf} (StreamID {endpoint.sid:#x}, seed {DEMO_SEED:#x}) and a "
                f"virtio-blk disk at {disk.bdf} (StreamID {disk.sid:#x}, a "
                f"{DEMO_DISK_BYTES // 2**20} MiB raw image {image}), then QEMU with all three "
                "as vfio-user devices and a DT with the SMMU node")
    async with NestedMachine(qemu, guest, config, cache=cache, name="demo") as nm:
        qemu_version = (await nm.vm.execute("query-version"))["qemu"]
        report.step(f"guest booted; SMMU BAR0 at {nm.smmu_bar:#x} (checked in sysfs and "
                    "query-pci)")
        report.detail(f"guest kernel: {await nm.sh('uname -r')}\n"
                      f"QEMU: {qemu_version['major']}.{qemu_version['minor']}."
                      f"{qemu_version['micro']}")
        await nm.wait_endpoint_bound(endpoint)
        report.step("guest arm-smmu-v3 driver probe lines (dmesg):")
        report.detail(await nm.dmesg("arm-smmu-v3.*(ias|entries|features)"))
        group = await nm.iommu_group(endpoint)
        report.step(f"endpoint {endpoint.bdf} is in IOMMU group {group}:")
        report.detail(await nm.sh(f"ls /sys/kernel/iommu_groups/{group}/devices; "
                                  f"echo type: $(cat /sys/kernel/iommu_groups/{group}/type)"))
        report.step(f"reading {DEMO_READ_BYTES // 1024} KiB from /dev/hwrng in the guest "
                    "(every byte DMA'd by the endpoint through the nested vSMMU)")
        sample = await nm.read_hwrng(DEMO_READ_BYTES)
        check = check_hwrng_sample(DEMO_SEED, sample)
        report.detail(f"guest sha256:    {check.guest_sha256}\n"
                      f"expected sha256: {check.expected_sha256}  (generator stream "
                      f"bytes {check.start}..{check.end}, seed {DEMO_SEED:#x})")
        skipped = (f"; {check.skipped} bytes in between went to the kernel's hwrng thread"
                   if check.skipped else "")
        report.step(f"DMA check passed: every 4 KiB block and the whole sha256 match{skipped}")
        await _disk_check(nm, disk, image, report)
        streams = await nm.service("query-vsmmu-streams", {"sid": endpoint.sid})
        state = await nm.service("query-vsmmu")
        report.step(f"service QMP: StreamID {endpoint.sid:#x} -> "
                    f"{streams[0].get('attached-to')}, {state['invalidations']} "
                    "HWPT_INVALIDATE calls; iommufd objects (query-vsmmu-iommufd):")
        report.detail(format_objects(await nm.service("query-vsmmu-iommufd")))
        report.step("shutting down")
    report.step("done")
    return 0


async def _disk_check(nm: NestedMachine, disk: NestedEndpoint, image: Path,
                      report: DemoReport) -> None:
    """The guest writes a pattern to the disk; the host finds it in the image; it reads back."""
    await nm.wait_endpoint_bound(disk)
    device = await nm.block_device(disk)
    name = device.removeprefix("/dev/")
    report.step(f"disk {device} ({disk.bdf}, serial {await nm.sh(f'cat /sys/block/{name}/serial')}"
                f", {int(await nm.sh(f'cat /sys/block/{name}/size')) * 512 // 2**20} MiB) in "
                f"IOMMU group {await nm.iommu_group(disk)}; the guest writes "
                f"{DEMO_DISK_WRITE // 1024} KiB of /dev/urandom to it with O_DIRECT")
    blocks = DEMO_DISK_WRITE // DEMO_DISK_BLOCK
    written = await nm.sh(
        f"dd if=/dev/urandom of=/tmp/pattern bs={DEMO_DISK_BLOCK} count={blocks} 2>/dev/null && "
        f"dd if=/tmp/pattern of={device} bs={DEMO_DISK_BLOCK} oflag=direct conv=fsync "
        "2>/dev/null && sha256sum /tmp/pattern", timeout=120)
    guest_sha = written.split()[0]
    with image.open("rb") as raw:
        host_sha = hashlib.sha256(raw.read(DEMO_DISK_WRITE)).hexdigest()
    read_back = (await nm.sh(
        f"dd if={device} bs={DEMO_DISK_BLOCK} count={blocks} iflag=direct 2>/dev/null "
        "| sha256sum", timeout=120)).split()[0]
    report.detail(f"guest sha256 of the pattern:   {guest_sha}\n"
                  f"host sha256 of the image file: {host_sha}\n"
                  f"guest sha256 read back:        {read_back}")
    if not guest_sha == host_sha == read_back:
        raise DmaCheckError("the disk's bytes differ between the guest and the image file")
    report.step("disk check passed: the image file holds what the guest wrote, and it reads back")
