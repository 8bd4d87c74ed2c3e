"""The invalidation matrix QEMU's own SMMU test runs: lazy (iommu.strict=0) and range
invalidation (``--ril``) on and off, each with the 1 MiB DMA check of test_nested_dma.

Strict mode without RIL is ``test_nested_dma.test_strict_nested_dma_of_one_mib`` (on both
guest kernels); these three complete the matrix on the default kernel.  In lazy mode
Linux defers its TLBIs to a flush queue and reuses no IOVA before the flush; with RIL it
invalidates ranges (TLBI_NH_VA with TG/NUM/SCALE) instead of page by page.  The
sanitizer (on for every e2e test) checks on each DMA that no stale IOTLB entry is used.
"""

from __future__ import annotations

import pytest

from qmp_harness.nested import NestedConfig, NestedEndpoint
from qmp_harness.nested_fixtures import StartNested
from vsmmu.arch.commands import CError
from vsmmu.demo import check_hwrng_sample

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
SEED = 0x3A7
ENDPOINT = NestedEndpoint(slot=2, seed=SEED)


@pytest.mark.parametrize("strict,ril", [(0, False), (0, True), (1, True)],
                         ids=["lazy", "lazy-ril", "strict-ril"])
async def test_one_mib_of_dma_in_each_invalidation_mode(
        nested_machine: StartNested, strict: int, ril: bool) -> None:
    nm = await nested_machine(NestedConfig(
        endpoints=(ENDPOINT,), append=(f"iommu.strict={strict}",),
        service_args=("--ril",) if ril else ()))
    await nm.wait_endpoint_bound(ENDPOINT)
    mode = "strict mode" if strict else "lazy mode"
    assert mode in await nm.dmesg("DMA domain TLB invalidation policy")
    before = await nm.service("query-vsmmu")

    sample = await nm.read_hwrng(MIB)
    check = check_hwrng_sample(SEED, sample)
    assert check.end - check.start - check.skipped == MIB

    after = await nm.service("query-vsmmu")
    assert after["invalidations"] > before["invalidations"], (before, after)
    assert after["cmdq"]["error"] == CError.NONE.name and after["active-errors"] == [], after
    assert after["sanitizer"]["enabled"] and after["sanitizer"]["total"] == 0, after
