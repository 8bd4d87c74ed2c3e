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

Every scenario runs on both guest kernels of the matrix.  Both print
``event 0xNN received:`` and the record's four raw dwords, which the tests
decode with :func:`vsmmu.arch.events.decode_event`.  Only the newer kernel
(trixie-backports, 7.x) adds the driver's own decoded line, ``event: C_BAD_STE
client: … sid: 0x10 ssid: 0x0``, and on it the tests assert that line itself.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from guest_images.kernel import DEFAULT_SUITE, NEWER_SUITE
from qmp_harness.dmesg import (
    UNASSIGNED_CLIENT,
    GuestEventReport,
    guest_decoded_events,
    guest_event_reports,
)
from qmp_harness.nested import NestedConfig, NestedEndpoint, NestedMachine
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
NO_SSID = 0
NO_IPA = 0
"""What the driver prints as the IPA of a stage-1 fault."""

GUEST_KERNELS = pytest.mark.parametrize("guest_suite,decodes", [
    pytest.param(DEFAULT_SUITE, False, id="6.12-raw-dwords"),
    pytest.param(NEWER_SUITE, True, id="newer-decoded"),
])
"""The kernel matrix: (suite, whether its driver prints the decoded event line)."""


def decoded_line(name: EventId, client: str, sid: int, tail: str = "") -> str:
    """The line a newer guest driver prints for an event (``tail``: the fault's addresses)."""
    return f"event: {name.name} client: {client} sid: {sid:#x} ssid: {NO_SSID:#x}{tail}"


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


@GUEST_KERNELS
async def test_cbadste_when_host_refuses_ats_in_nested_ste(
    nested_machine: StartNested, guest_suite: str, decodes: bool,
) -> None:
    nm = await nested_machine(NestedConfig(
        endpoints=(ATS_ENDPOINT,), ats=True, host_no_ats_nested=True,
        cbadste_policy="event", guest_suite=guest_suite))
    sid = ATS_ENDPOINT.sid

    report, dmesg = await wait_guest_event(nm, EventId.C_BAD_STE, sid)
    assert f"event {EventId.C_BAD_STE:#04x} received:" in dmesg
    assert decode_event(report.record()).name == EventId.C_BAD_STE.name
    if decodes:
        assert decoded_line(EventId.C_BAD_STE, ATS_ENDPOINT.bdf, sid) in dmesg, dmesg

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


@GUEST_KERNELS
async def test_injected_cbadste_and_cbadstreamid(
    nested_machine: StartNested, guest_suite: str, decodes: bool,
) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,), guest_suite=guest_suite))
    await nm.wait_endpoint_bound(ENDPOINT)
    before = await nm.service("query-vsmmu-streams", {"sid": UNUSED_SID})
    assert before[0]["status"] == "VALID", before  # Linux's initial abort STE

    written = await nm.service("x-vsmmu-write-ste", {"sid": UNUSED_SID, "dwords": [0, 0]})
    assert written["status"] != "VALID", written
    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": UNUSED_SID, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.C_BAD_STE.name, result
    _, dmesg = await wait_guest_event(nm, EventId.C_BAD_STE, UNUSED_SID)
    if decodes:
        assert decoded_line(EventId.C_BAD_STE, UNASSIGNED_CLIENT, UNUSED_SID) in dmesg, dmesg
    await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                match={"type": EventId.C_BAD_STE.name, "sid": UNUSED_SID})

    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": SIDSIZE_LIMIT, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.C_BAD_STREAMID.name, result
    _, dmesg = await wait_guest_event(nm, EventId.C_BAD_STREAMID, SIDSIZE_LIMIT)
    if decodes:
        assert decoded_line(EventId.C_BAD_STREAMID, UNASSIGNED_CLIENT, SIDSIZE_LIMIT) in dmesg, \
            dmesg
    await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                match={"type": EventId.C_BAD_STREAMID.name,
                                       "sid": SIDSIZE_LIMIT})
    # The endpoint was not disturbed.
    await nm.sh("head -c 64 /dev/hwrng > /dev/null")


@GUEST_KERNELS
async def test_translation_fault_at_unmapped_iova(
    nested_machine: StartNested, guest_suite: str, decodes: bool,
) -> None:
    nm = await nested_machine(NestedConfig(endpoints=(ENDPOINT,), guest_suite=guest_suite))
    await nm.wait_endpoint_bound(ENDPOINT)
    result = await nm.service("x-vsmmu-inject-transaction",
                              {"sid": ENDPOINT.sid, "iova": UNMAPPED_IOVA})
    assert not result["ok"] and result["event"] == EventId.F_TRANSLATION.name, result

    report, dmesg = await wait_guest_event(nm, EventId.F_TRANSLATION, ENDPOINT.sid)
    assert f"event {EventId.F_TRANSLATION:#04x} received:" in dmesg
    assert f"{UNMAPPED_IOVA:#018x}" in dmesg, dmesg
    assert decode_event(report.record()).fields["input_addr"] == UNMAPPED_IOVA
    if decodes:
        line = decoded_line(EventId.F_TRANSLATION, ENDPOINT.bdf, ENDPOINT.sid,
                            f" iova: {UNMAPPED_IOVA:#x} ipa: {NO_IPA:#x}")
        assert line in dmesg, dmesg
        decoded = [e for e in guest_decoded_events(dmesg) if e.name == EventId.F_TRANSLATION.name]
        assert decoded and decoded[0].iova == UNMAPPED_IOVA, decoded
    event = await nm.wait_service_event("VSMMU_EVENT", EVENT_TIMEOUT,
                                        match={"type": EventId.F_TRANSLATION.name,
                                               "sid": ENDPOINT.sid})
    assert event["data"]["fields"]["input_addr"] == UNMAPPED_IOVA, event
