"""``vsmmu demo`` (``make run``): a stock guest boots with the nested vSMMU and does DMA.

The demo starts ``vsmmu serve`` (sim backend) with one virtio-rng endpoint,
boots the Debian guest through :class:`qmp_harness.nested.NestedMachine` and
shows, step by step: the guest driver's SMMU probe lines, the endpoint in an
IOMMU group, a DMA check (the SHA-256 of bytes read from ``/dev/hwrng`` in
the guest equals the SHA-256 of the endpoint generator's stream at the same
offset) and the iommufd objects the service created, read over its QMP.

:func:`check_hwrng_sample` is the DMA check, shared with the e2e tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qmp_harness.nested import HwrngSample, NestedConfig, NestedEndpoint, NestedMachine
from vsmmu.endpoints.virtio_rng import (
    locate_in_stream,
    match_stream_blocks,
)

logger = logging.getLogger(__name__)

DEMO_READ_BYTES = 256 * 1024
DEMO_SEED = 0x5EED
STREAM_LOOKAHEAD = 256 * 1024
"""How far past the last checked byte a new read may start (boot-time and kthread takes)."""


class DmaCheckError(AssertionError):
    """The guest's ``/dev/hwrng`` bytes are not the endpoint's stream."""


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
    report = DemoReport(out)
    endpoint = NestedEndpoint(slot=2, seed=DEMO_SEED)
    config = NestedConfig(endpoints=(endpoint,), append=("iommu.strict=1",))
    report.step(f"starting `vsmmu serve` (sim backend) with a virtio-rng endpoint at "
                f"{endpoint.bdf} (StreamID {endpoint.sid:#x}, seed {DEMO_SEED:#x}), then "
                "QEMU with both as vfio-user devices and a DT with the SMMU node")
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
        streams = await nm.service("query-vsmmu-streams", {"sid": endpoint.sid})
        state = await nm.service("query-vsmmu")
        report.step(f"service QMP: StreamID {endpoint.sid:#x} -> "
                    f"{streams[0].get('attached-to')}, {state['invalidations']} "
                    "HWPT_INVALIDATE calls; iommufd objects (query-vsmmu-iommufd):")
        report.detail(format_objects(await nm.service("query-vsmmu-iommufd")))
        report.step("shutting down")
    report.step("done")
    return 0
