"""Endpoint hot-unplug and re-plug (QMP ``device_del``/``device_add``) behind the nested vSMMU.

Functions on the root bus ``pcie.0`` are not hot-pluggable, so the endpoint
sits at ``01:00.0`` behind a ``pcie-root-port`` (RID = StreamID 0x100; the DT
``iommu-map`` covers it).  The recipe adds ``pci=hpmmiosize=0`` so the port's
32-bit window does not push the SMMU BAR away from the DT's address.  The
guest's pciehp handles the attention-button removal and the re-insertion; the
service keeps listening on the endpoint's socket, QEMU reconnects on
``device_add``, and the re-probed driver's DMA goes through a new nested HWPT.
"""

from __future__ import annotations

import json

import pytest

from qmp_harness.nested import NestedConfig, NestedEndpoint
from qmp_harness.nested_fixtures import StartNested
from vsmmu.demo import check_hwrng_sample

pytestmark = pytest.mark.e2e

SEED = 0x4077
ENDPOINT = NestedEndpoint(slot=4, seed=SEED, behind_root_port=True)
UNPLUG_TIMEOUT = 30.0
SAMPLE = 64 * 1024


async def test_endpoint_unplug_and_replug(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    assert await nm.iommu_group(ENDPOINT) is not None
    first = check_hwrng_sample(SEED, await nm.read_hwrng(SAMPLE))
    rows = await nm.service("query-vsmmu-streams", {"sid": ENDPOINT.sid})
    assert rows[0]["attached-to"] == f"nested HWPT {rows[0]['hwpt-id']}", rows

    since = len(nm.vm.events)
    await nm.vm.execute("device_del", {"id": ENDPOINT.name})
    deleted = await nm.vm.wait_event("DEVICE_DELETED", UNPLUG_TIMEOUT, since=since)
    assert deleted["data"].get("device") == ENDPOINT.name, deleted
    await nm.wait_guest(f"[ ! -e /sys/bus/pci/devices/{ENDPOINT.bdf} ]")
    assert ENDPOINT.bdf not in await nm.sh("ls /sys/bus/pci/devices")
    assert all(d.get("qdev_id") != ENDPOINT.name for d in await nm.vm.query_pci())

    await nm.vm.execute("device_add", json.loads(ENDPOINT.device_json(
        nm.endpoint_socket(ENDPOINT))))
    await nm.wait_endpoint_bound(ENDPOINT)
    assert await nm.iommu_group(ENDPOINT) is not None
    # The function was reset by the re-plug: its stream starts again.
    again = check_hwrng_sample(SEED, await nm.read_hwrng(SAMPLE))
    assert again.start < first.end, (first, again)
    rows = await nm.service("query-vsmmu-streams", {"sid": ENDPOINT.sid})
    assert rows[0]["attached-to"] == f"nested HWPT {rows[0]['hwpt-id']}", rows
    state = await nm.service("query-vsmmu")
    assert state["active-errors"] == [], state
    assert "pciehp" in await nm.dmesg("pciehp")
