"""Event reporting to a stock Linux guest through the nested vSMMU, driven over both QMPs.

* C_BAD_STE, realistic: the vSMMU advertises ATS, the endpoint has an ATS
  capability, the DT marks the root complex ``ats-supported``; the guest
  writes an STE with EATS=1, the sim host (``--host-no-ats-nested``) fails
  HWPT_ALLOC with EIO, and the service (policy ``event``) writes C_BAD_STE
  into the guest's event queue.
* C_BAD_STE / C_BAD_STREAMID, injected with ``x-vsmmu-inject-transaction``.
  Linux never leaves an STE invalid (it initialises every STE of its table to
  abort or bypass, V=1), so the invalid STE is made with ``x-vsmmu-write-ste``;
  a SID at or above 2**SIDSIZE is beyond the stream table.
* F_TRANSLATION at an IOVA the guest never mapped, on the endpoint's SID.

The guest kernel (6.12) prints ``event 0xNN received:`` and the record's four
raw dwords (newer kernels add a decoded line with the name); the tests decode
those dwords with :func:`vsmmu.arch.events.decode_event`.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from qmp_harness.nested import (
    GuestEventReport,
    NestedConfig,
    NestedEndpoint,
    NestedMachine,
    guest_event_reports,
)
from qmp_harness.nested_fixtures import StartNested
from vsmmu.arch.events import EventId, decode_event
from vsmmu.arch.ste import STE_SIZE, Eats, Ste

pytestmark = pytest.mark.e2e

ENDPOINT = NestedEndpoint(slot=2, seed=7)
ATS_ENDPOINT = NestedEndpoint(slot=2, seed=7, ats=True)
UNUSED_SID = NestedEndpoint(slot=3).sid
"""A StreamID in the same level-2 table as the endpoint's, with no device."""
SIDSIZE_LIMIT = 1 << 16
"""The vSMMU's 2**SIDSIZE: the first StreamID beyond any stream table the guest can have."""
UNMAPPED_IOVA = 0xDEAD000
"""Below the guest's IOVA allocator's range (it allocates top-down from the DMA mask)."""
EVENT_TIMEOUT = 20.0
STE_DWORDS = STE_SIZE // 8


async def wait_guest_event(nm: NestedMachine, event_id: EventId,
                           sid: int) -> tuple[GuestEventReport, str]:
    """Wait until the guest driver reported ``event_id`` for ``sid``; return it and dmesg."""
    for _ in range(int(EVENT_TIMEOUT / 0.2)):
        dmesg = await nm.dmesg("arm-smmu-v3")
        for report in guest_event_reports(dmesg):
            event = decode_event(report.record())
            if report.event_id == event_id and event.sid == sid:
                return report, dmesg
        await asyncio.sleep(0.2)
    raise AssertionError(f"the guest never reported {event_id.name} for SID {sid:#x}:\n"
                         f"{await nm.dmesg('arm-smmu-v3')}")


async def test_cbadste_when_host_refuses_ats_in_nested_ste(
    nested_machine: StartNested,
) -> None:
    nm = await nested_machine(NestedConfig(
        endpoints=(ATS_ENDPOINT,), ats=True, host_no_ats_nested=True,
        cbadste_policy="event"))
    sid = ATS_ENDPOINT.sid

    report, dmesg = await wait_guest_event(nm, EventId.C_BAD_STE, sid)
    assert f"event {EventId.C_BAD_STE:#04x} received:" in dmesg
    assert decode_event(report.record()).name == EventId.C_BAD_STE.name
    # Newer guest kernels also print the decoded event; 6.12 prints raw dwords only.
    if "event: " in dmesg:
        assert EventId.C_BAD_STE.name in dmesg

    # The guest did enable ATS for the endpoint: its STE asks for EATS.
    rows = await nm.service("query-vsmmu-streams", {"sid": sid})
    assert f"EATS={int(Eats.FULL)}" in str(rows[0]["ste"]), rows

    # The service reported the refusal and the event over its QMP ...
    event = await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                        match={"type": EventId.C_BAD_STE.name, "sid": sid})
    assert event["data"]["written"] is True, event
    refused = [e for e in nm.service_events if e["event"] == "VSMMU_HWPT_ALLOC"
               and e["data"]["sid"] == sid and e["data"]["errno"] == errno.errorcode[errno.EIO]]
    assert refused and refused[0]["data"]["hwpt-id"] is None, nm.service_events
    # ... and attached the endpoint to an abort vSTE (V=0) instead of the refused one.
    objects = {o["id"]: o for o in await nm.service("query-vsmmu-iommufd")}
    attached = objects[rows[0]["hwpt-id"]]
    assert attached["type"] == "hwpt_nested", attached
    vste = Ste.from_words((int(attached["detail"]["ste0"], 16),
                           int(attached["detail"]["ste1"], 16), *[0] * (STE_DWORDS - 2)))
    assert vste.v == 0, attached


async def test_injected_cbadste_and_cbadstreamid(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    before = await nm.service("query-vsmmu-streams", {"sid": UNUSED_SID})
    assert before[0]["status"] == "VALID", before  # Linux's initial abort STE

    written = await nm.service("x-vsmmu-write-ste", {"sid": UNUSED_SID, "dwords": [0, 0]})
    assert written["status"] != "VALID", written
    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": UNUSED_SID, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.C_BAD_STE.name, result
    await wait_guest_event(nm, EventId.C_BAD_STE, UNUSED_SID)
    await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                match={"type": EventId.C_BAD_STE.name, "sid": UNUSED_SID})

    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": SIDSIZE_LIMIT, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.C_BAD_STREAMID.name, result
    await wait_guest_event(nm, EventId.C_BAD_STREAMID, SIDSIZE_LIMIT)
    await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                match={"type": EventId.C_BAD_STREAMID.name,
                                       "sid": SIDSIZE_LIMIT})
    # The endpoint was not disturbed.
    await nm.sh("head -c 64 /dev/hwrng > /dev/null")


async def test_translation_fault_at_unmapped_iova(nested_machine: StartNested) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,)))
    await nm.wait_endpoint_bound(ENDPOINT)
    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": ENDPOINT.sid, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.F_TRANSLATION.name, result

    report, dmesg = await wait_guest_event(nm, EventId.F_TRANSLATION, ENDPOINT.sid)
    assert f"event {EventId.F_TRANSLATION:#04x} received:" in dmesg
    assert f"{UNMAPPED_IOVA:#018x}" in dmesg, dmesg
    assert decode_event(report.record()).fields["input_addr"] == UNMAPPED_IOVA
    event = await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                        match={"type": EventId.F_TRANSLATION.name,
                                               "sid": ENDPOINT.sid})
    assert event["data"]["fields"]["input_addr"] == UNMAPPED_IOVA, event
