"""A stock Linux guest does DMA through the nested vSMMU: translated, bypassed, after a reset.

The guest is booted by :class:`qmp_harness.nested.NestedMachine` (the service
as a subprocess, the SMMU node in the DT, the driver re-probed from
``/init``).  Every byte the guest reads from ``/dev/hwrng`` was written by the
virtio-rng endpoint through its DMA port, i.e. translated by the sim backend
with the guest's own S1 tables nested in the IOAS; the bytes are checked
against the endpoint's seeded generator (:func:`vsmmu.demo.check_hwrng_sample`).
"""

from __future__ import annotations

import time

import pytest

from guest_images.kernel import DEFAULT_SUITE, NEWER_SUITE
from qmp_harness.nested import NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.nested_fixtures import StartNested
from vsmmu.arch.commands import CError
from vsmmu.arch.ste import SteConfig
from vsmmu.demo import check_hwrng_sample

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
SEED = 0x0E2E
ENDPOINT = NestedEndpoint(slot=2, seed=SEED)
SERVICE_OWN_OBJECTS = {"ioas", "device", "hwpt_paging"}
"""What the service keeps without a guest: its IOAS, the endpoint devices, the S2 parent."""
GUEST_OBJECTS = {"viommu", "vdevice", "hwpt_nested", "veventq"}
RESET_SETTLE_S = 10.0


async def objects_by_type(nm: NestedMachine) -> dict[str, list[int]]:
    """The service's iommufd objects (over its QMP), grouped by type."""
    table: dict[str, list[int]] = {}
    for obj in await nm.service("query-vsmmu-iommufd"):
        table.setdefault(obj["type"], []).append(obj["id"])
    return table


async def stream(nm: NestedMachine) -> dict[str, object]:
    """The endpoint's row of ``query-vsmmu-streams``."""
    rows = await nm.service("query-vsmmu-streams", {"sid": ENDPOINT.sid})
    assert len(rows) == 1, rows
    row: dict[str, object] = rows[0]
    return row


@pytest.mark.parametrize("guest_suite", [DEFAULT_SUITE, NEWER_SUITE])
async def test_strict_nested_dma_of_one_mib(nested_machine: StartNested, guest_suite: str) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,), append=("iommu.strict=1",),
                                           guest_suite=guest_suite))
    await nm.wait_endpoint_bound(ENDPOINT)
    assert "strict mode" in await nm.dmesg("DMA domain TLB invalidation policy")
    group = await nm.iommu_group(ENDPOINT)
    assert group is not None
    assert await nm.sh(f"cat /sys/kernel/iommu_groups/{group}/type") == "DMA"
    before = await nm.service("query-vsmmu")

    started = time.monotonic()
    sample = await nm.read_hwrng(MIB)
    elapsed = time.monotonic() - started
    check = check_hwrng_sample(SEED, sample)
    assert check.end - check.start - check.skipped == MIB
    print(f"\n{nm.guest.release}: 1 MiB of /dev/hwrng through the nested vSMMU in {elapsed:.1f}s "
          f"(stream {check.start}..{check.end}, {check.skipped} bytes taken by hwrng kthread)")

    # The endpoint's StreamID is attached to a nested HWPT built from the guest's STE.
    row = await stream(nm)
    assert row["status"] == "VALID" and row["endpoint"] == ENDPOINT.name, row
    assert f"Config={SteConfig.S1_TRANS.name}" in str(row["ste"]), row
    assert row["attached-to"] == f"nested HWPT {row['hwpt-id']}", row
    objects = await nm.service("query-vsmmu-iommufd")
    nested = {o["id"]: o for o in objects if o["type"] == "hwpt_nested"}
    assert row["hwpt-id"] in nested and nested[row["hwpt-id"]]["users"] == 1, objects
    device = next(o for o in objects if o["type"] == "device")
    assert device["detail"]["hwpt"] == row["hwpt-id"] and device["detail"]["vsid"] == ENDPOINT.sid
    assert any(e["event"] == "VSMMU_HWPT_ALLOC" and e["data"]["sid"] == ENDPOINT.sid
               and e["data"]["hwpt-id"] == row["hwpt-id"] for e in nm.service_events)

    # Strict mode: every unmap of the DMA buffers is invalidated before it is reused.
    after = await nm.service("query-vsmmu")
    assert after["invalidations"] - before["invalidations"] > 0, (before, after)
    assert after["cmdq"]["error"] == CError.NONE.name, after
    assert after["active-errors"] == [], after
    assert not [e for e in nm.service_events if e["event"] == "VSMMU_EVENT"], nm.service_events


async def test_passthrough_guest_uses_bypass(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,),
                                           append=("iommu.passthrough=1",)))
    await nm.wait_endpoint_bound(ENDPOINT)
    group = await nm.iommu_group(ENDPOINT)
    assert group is not None
    assert await nm.sh(f"cat /sys/kernel/iommu_groups/{group}/type") == "identity"

    sample = await nm.read_hwrng(256 * 1024)
    check_hwrng_sample(SEED, sample)

    row = await stream(nm)
    assert f"Config={SteConfig.BYPASS.name}" in str(row["ste"]), row
    state = await nm.service("query-vsmmu")
    assert state["enabled"] and state["active-errors"] == [], state
    assert not [e for e in nm.service_events if e["event"] == "VSMMU_EVENT"], nm.service_events


async def test_system_reset_boots_again_with_fresh_objects(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    first = check_hwrng_sample(SEED, await nm.read_hwrng(64 * 1024))
    first_guest = (await nm.service("query-vsmmu"))["guest-objects"]
    assert first_guest, "no guest objects after the first boot"
    service_own = await objects_by_type(nm)

    # Stop the CPUs so the reset state can be observed before the guest runs again.
    await nm.vm.execute("stop")
    await nm.vm.execute("system_reset")
    deadline = time.monotonic() + RESET_SETTLE_S
    while (await nm.service("query-vsmmu"))["guest-objects"]:
        assert time.monotonic() < deadline, "the service kept guest objects after system_reset"
    after_reset = await objects_by_type(nm)
    assert set(after_reset) <= SERVICE_OWN_OBJECTS, after_reset
    assert {t: service_own[t] for t in after_reset} == after_reset, (service_own, after_reset)
    assert not (await nm.service("query-vsmmu"))["enabled"]

    await nm.vm.execute("cont")
    await nm.verify_smmu_bar()
    await nm.vm.wait_ready()
    await nm.wait_endpoint_bound(ENDPOINT)
    again = check_hwrng_sample(SEED, await nm.read_hwrng(64 * 1024))
    # The device was reset: the stream started again from its beginning.
    assert again.start < first.end, (first, again)
    second = await objects_by_type(nm)
    assert set(second) >= GUEST_OBJECTS, second
    row = await stream(nm)
    assert row["attached-to"] == f"nested HWPT {row['hwpt-id']}", row
    resets = [e for e in nm.vm.events if e["event"] == "RESET"]
    assert resets, nm.vm.events
