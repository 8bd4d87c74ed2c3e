"""The sanitizer tripped from inside a stock guest, and host-side faults injected over QMP.

Every other e2e test runs its service with ``--sanitize`` and fails on any
guest error (the ``nested_machine`` fixture); these provoke one on purpose:

* the guest itself, through ``/dev/mem`` (``iomem=relaxed`` lets root map the
  SMMU's claimed registers; RAM stays off limits under STRICT_DEVMEM), moves
  EVENTQ_CONS so that its event queue is full: the next event is lost and the
  sanitizer reports ``eventq-full``; the driver then sees the overflow flag and
  puts CONS back;
* ``x-vsmmu-inject-vevent``: an F_TRANSLATION record for the endpoint's
  physical StreamID reaches the guest with its own StreamID, and a LOST_EVENTS
  header becomes its event queue's overflow flag;
* ``x-vsmmu-fail``: a refused invalidation is CERROR_ILL at exactly that
  command (the driver skips it and goes on), a refused nested HWPT is the
  C_BAD_STE policy, and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from qmp_harness.dmesg import guest_event_reports
from qmp_harness.nested import NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.nested_fixtures import StartNested
from vsmmu.arch.events import EventId, decode_event, encode_event
from vsmmu.arch.registers import Reg

pytestmark = pytest.mark.e2e

ENDPOINT = NestedEndpoint(slot=2, seed=0x5A)
SIDSIZE_LIMIT = 1 << 16
FAULT_IOVA = 0xBAD000
TIMEOUT = 30.0
EVTQ_OVERFLOW_LINE = "EVTQ overflow detected"
CMDQ_ERROR = re.compile(r"CMDQ error \(cons (0x[0-9a-f]+)\): Illegal command")


async def wait_dmesg(nm: NestedMachine, pattern: str) -> str:
    """Wait until the guest kernel log has a line matching ``pattern``; return the log."""
    for _ in range(int(TIMEOUT / 0.2)):
        dmesg = await nm.dmesg("arm-smmu-v3")
        if re.search(pattern, dmesg):
            return dmesg
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the guest log:\n{await nm.dmesg('arm-smmu-v3')}")


async def physical_sid(nm: NestedMachine) -> int:
    """The endpoint's physical StreamID (its iommufd device's)."""
    devices = [o for o in await nm.service("query-vsmmu-iommufd") if o["type"] == "device"]
    (device,) = [d for d in devices if d["detail"]["vsid"] == ENDPOINT.sid]
    sid: int = device["detail"]["sid"]
    return sid


async def test_guest_devmem_leaves_its_event_queue_full(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(
        endpoints=(ENDPOINT,), append=("iomem=relaxed",),
        allowed_guest_errors=frozenset({"eventq-full"})))
    await nm.wait_endpoint_bound(ENDPOINT)
    assert nm.smmu_bar is not None
    evtq = (await nm.service("query-vsmmu"))["evtq"]
    assert not evtq["overflow"], evtq
    full = evtq["prod"] ^ (1 << evtq["log2size"])  # same index, other wrap: PROD-CONS = size
    await nm.sh(f"devmem {nm.smmu_bar + Reg.EVENTQ_CONS:#x} 32 {full:#x}")
    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": SIDSIZE_LIMIT, "iova": FAULT_IOVA})
    assert result["event"] == EventId.C_BAD_STREAMID.name, result
    error = await nm.wait_service_event("VSMMU_GUEST_ERROR", TIMEOUT,
                                        match={"kind": "eventq-full"})
    assert error["data"]["sid"] == SIDSIZE_LIMIT, error
    assert decode_event(b"".join(int(w, 16).to_bytes(8, "little")
                                 for w in error["data"]["words"])).sid == SIDSIZE_LIMIT
    # The driver saw the overflow flag and took its queue back.
    await wait_dmesg(nm, EVTQ_OVERFLOW_LINE)
    await nm.sh("head -c 64 /dev/hwrng > /dev/null")
    state = await nm.service("query-vsmmu")
    assert state["sanitizer"]["counts"]["eventq-full"] == 1, state
    assert not state["evtq"]["overflow"], state


async def test_injected_vevent_and_lost_events_reach_the_guest(
        nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    psid = await physical_sid(nm)
    record = encode_event(EventId.F_TRANSLATION, sid=psid, input_addr=FAULT_IOVA, rnw=1)
    dwords = [int.from_bytes(record[i:i + 8], "little") for i in range(0, len(record), 8)]
    reply = await nm.service("x-vsmmu-inject-vevent", {"sid": psid, "dwords": dwords})
    assert reply["vsid"] == ENDPOINT.sid and reply["events"] == 1, reply
    dmesg = await wait_dmesg(nm, f"event {EventId.F_TRANSLATION:#04x} received")
    (report,) = [r for r in guest_event_reports(dmesg) if r.event_id == EventId.F_TRANSLATION]
    seen = decode_event(report.record())
    assert seen.sid == ENDPOINT.sid and seen.fields["input_addr"] == FAULT_IOVA, seen

    overflows = len([e for e in nm.service_events if e["event"] == "VSMMU_EVENT"
                     and e["data"]["type"] == "OVERFLOW"])
    reply = await nm.service("x-vsmmu-inject-vevent", {"lost-events": True})
    assert reply["lost-events"] is True and reply["events"] == 0, reply
    # A flag alone raises no interrupt (the queue is not empty only when it has records):
    # the driver finds it with the next event, as after a real overflow.
    await nm.service("x-vsmmu-inject-vevent", {"sid": psid, "dwords": dwords})
    await wait_dmesg(nm, EVTQ_OVERFLOW_LINE)
    assert len([e for e in nm.service_events if e["event"] == "VSMMU_EVENT"
                and e["data"]["type"] == "OVERFLOW"]) == overflows + 1
    with pytest.raises(Exception, match="host forwards only"):
        await nm.service("x-vsmmu-inject-vevent", {"sid": psid, "event-id": 0x05})


async def test_backend_failures_have_the_documented_guest_outcome(
        nested_machine: StartNested) -> None:
    # A skipped TLBI leaves its IOTLB entry: a later DMA through it is a real stale use.
    nm = await nested_machine(NestedConfig(
        endpoints=(ENDPOINT,), append=("iommu.strict=1",),
        allowed_guest_errors=frozenset({"stale-translation"})))
    await nm.wait_endpoint_bound(ENDPOINT)
    await nm.sh("head -c 4096 /dev/hwrng > /dev/null")

    # hwpt_invalidate refused at entry 0: CERROR_ILL at that command, the guest goes on.
    armed = await nm.service("x-vsmmu-fail", {"op": "hwpt_invalidate", "errno": "EIO"})
    assert armed["armed"]["hwpt_invalidate"]["errno"] == "EIO", armed
    await nm.sh("head -c 4096 /dev/hwrng > /dev/null")
    cerror = await nm.wait_service_event("VSMMU_CERROR", TIMEOUT)
    assert cerror["data"]["error"] == "ILL" and "TLBI" in cerror["data"]["command"], cerror
    dmesg = await wait_dmesg(nm, CMDQ_ERROR.pattern)
    match = CMDQ_ERROR.search(dmesg)
    assert match is not None
    log2size = (await nm.service("query-vsmmu"))["cmdq"]["log2size"]
    assert int(match.group(1), 16) & ((1 << log2size) - 1) == cerror["data"]["index"], dmesg
    await nm.sh("head -c 4096 /dev/hwrng > /dev/null")

    # hwpt_alloc refused for the endpoint's next STE: C_BAD_STE policy, nothing leaked.
    group = await nm.iommu_group(ENDPOINT)
    await nm.sh(f"echo {ENDPOINT.bdf} > /sys/bus/pci/devices/{ENDPOINT.bdf}/driver/unbind")
    await nm.sh(f"echo identity > /sys/kernel/iommu_groups/{group}/type")
    await nm.service("x-vsmmu-fail", {"op": "hwpt_alloc", "errno": "EIO"})
    await nm.sh(f"echo DMA > /sys/kernel/iommu_groups/{group}/type")
    refused = await nm.wait_service_event("VSMMU_HWPT_ALLOC", TIMEOUT,
                                          match={"sid": ENDPOINT.sid, "errno": "EIO"})
    assert refused["data"]["hwpt-id"] is None, refused
    dmesg = await wait_dmesg(nm, f"event {EventId.C_BAD_STE:#04x} received")
    assert any(decode_event(r.record()).sid == ENDPOINT.sid
               for r in guest_event_reports(dmesg) if r.event_id == EventId.C_BAD_STE), dmesg
    objects = await nm.service("query-vsmmu-iommufd")
    state = await nm.service("query-vsmmu")
    assert state["fault-injection"]["injected"] == {"hwpt_invalidate": 1, "hwpt_alloc": 1}
    assert state["fault-injection"]["armed"] == {}, state
    guest_ids = set(state["guest-objects"])
    assert {o["id"] for o in objects if o["type"] in ("hwpt_nested", "vdevice", "viommu",
                                                      "veventq")} <= guest_ids, objects
