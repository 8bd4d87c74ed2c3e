"""iommu-testdev under qtest: QEMU's own device and our emulated one, with the SMMU off.

The same register sequence (program, arm, see BUSY, trigger, read RESULT)
runs on both targets; with SMMUEN=0 and GBPA.ABORT=0 every DMA bypasses,
so the bytes must land at the IOVA itself.  Expected values come from
QEMU's docs/specs/iommu-testdev.rst.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmp_harness.differential.targets import QemuSmmuTarget, Target, VsmmuTarget
from qmp_harness.provision import ensure_qemu
from qmp_harness.qtest import VIRT_RAM

pytestmark = pytest.mark.integration

BUSY, OK, MISMATCH, NOT_ARMED = 0xFFFF_FFFE, 0, 0xDEAD_0004, 0xDEAD_0005
SCRATCH = VIRT_RAM + 0x20_0000
GBPA, GBPA_UPDATE, GBPA_ABORT = 0x44, 1 << 31, 1 << 20


@pytest.fixture(params=["qemu", "vsmmu"])
async def target(request: pytest.FixtureRequest, vsmmu_cache: Path) -> AsyncIterator[Target]:
    install = ensure_qemu(vsmmu_cache, quiet=True)
    kind = QemuSmmuTarget if request.param == "qemu" else VsmmuTarget
    async with kind(install) as running:
        yield running


async def dma(target: Target, iova: int, gpa: int, length: int) -> tuple[int, int]:
    bar = target.testdev_bar
    replies = await target.qtest.pipeline([
        f"writel {bar + 0x04:#x} {iova & 0xFFFF_FFFF:#x}",
        f"writel {bar + 0x08:#x} {iova >> 32:#x}",
        f"writel {bar + 0x1C:#x} {gpa & 0xFFFF_FFFF:#x}",
        f"writel {bar + 0x20:#x} {gpa >> 32:#x}",
        f"writel {bar + 0x0C:#x} {length:#x}", f"writel {bar + 0x18:#x} 0xa",
        f"writel {bar + 0x14:#x} 0x1", f"readl {bar + 0x10:#x}", f"readl {bar:#x}",
        f"readl {bar + 0x10:#x}"])
    return int(replies[7], 16), int(replies[9], 16)


async def test_bypass_dma_lands_at_the_iova(target: Target) -> None:
    await target.qtest.memset(SCRATCH, 0x100)
    assert await dma(target, SCRATCH + 0x10, SCRATCH + 0x10, 10) == (BUSY, OK)
    landed = await target.qtest.read(SCRATCH, 0x20)
    assert landed == bytes(0x10) + bytes.fromhex("78563412785634127856") + bytes(6)
    assert await dma(target, SCRATCH, SCRATCH + 0x40, 4) == (BUSY, MISMATCH)
    assert await target.qtest.readl(target.testdev_bar) == 0
    assert await target.qtest.readl(target.testdev_bar + 0x10) == NOT_ARMED


async def test_gbpa_abort_fails_the_write_and_reset_clears_it(target: Target) -> None:
    await target.qtest.memset(SCRATCH, 0x100)
    await target.qtest.writel(target.smmu_base + GBPA, GBPA_UPDATE | GBPA_ABORT)
    assert (await dma(target, SCRATCH, SCRATCH, 4))[1] == 0xDEAD_0002
    assert await target.qtest.read(SCRATCH, 4) == bytes(4)
    await target.reset()
    assert await dma(target, SCRATCH, SCRATCH, 4) == (BUSY, OK)
