"""QEMU dies under the service: the service tears the guest's state down and keeps serving.

A dead VMM is the roughest disconnect there is: no DEVICE_RESET, no DMA_UNMAP,
the sockets just close.  The service must destroy every iommufd object it
created for the guest, stay up, answer QMP, and accept the next vfio-user
client on the same sockets (a restarted QEMU).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from qmp_harness.nested import NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.nested_fixtures import StartNested
from vsmmu.vfio_user.client import VfioUserClient

pytestmark = pytest.mark.e2e

ENDPOINT = NestedEndpoint(slot=2, seed=0xDEAD)
GUEST_OBJECTS = {"viommu", "vdevice", "hwpt_nested", "veventq"}
TEARDOWN_TIMEOUT_S = 10.0


async def object_types(nm: NestedMachine) -> set[str]:
    """The types of the service's iommufd objects, over its QMP."""
    return {obj["type"] for obj in await nm.service("query-vsmmu-iommufd")}


async def test_qemu_killed_service_tears_down_and_keeps_serving(
    nested_machine: StartNested,
) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    assert (await nm.service("query-vsmmu"))["enabled"] is True
    assert await object_types(nm) >= GUEST_OBJECTS

    pid = nm.vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    while GUEST_OBJECTS & await object_types(nm):
        assert time.monotonic() < deadline, (
            f"guest objects still present {TEARDOWN_TIMEOUT_S} s after QEMU died: "
            f"{await nm.service('query-vsmmu-iommufd')}")
        await asyncio.sleep(0.2)
    state = await nm.service("query-vsmmu")
    assert state["enabled"] is False
    assert state["guest-objects"] == []

    # The next VMM can attach to the same SMMU function and endpoint sockets.
    for path in (nm.socket_dir / "smmu.sock", nm.endpoint_socket(ENDPOINT)):
        client = VfioUserClient()
        await client.connect(str(path))
        try:
            await client.negotiate()
            flags, regions, irqs = await client.device_info()
            assert regions > 0 and irqs > 0, (path, flags, regions, irqs)
        finally:
            await client.close()
    assert (await nm.service("query-vsmmu"))["enabled"] is False
