"""The nested recipe's pure parts: DT node, init steps, service command line, dmesg parsing."""

from __future__ import annotations

import json
from pathlib import Path

from qmp_harness.devicetree import pci_rid, virt_intx_spi
from qmp_harness.dmesg import UNASSIGNED_CLIENT, guest_decoded_events, guest_event_reports
from qmp_harness.nested import (
    BAR_LINE,
    EXPECTED_SMMU_BAR,
    SMMU_SLOT,
    NestedConfig,
    NestedEndpoint,
    init_fragments,
    smmu_function_device,
    smmu_node,
)
from vsmmu.arch.events import EventId, decode_event
from vsmmu.service import EndpointConfig

DMESG = """\
[    6.014085] arm-smmu-v3 10000000.smmuv3: event 0x04 received:
[    6.014108] arm-smmu-v3 10000000.smmuv3: \t0x0000001800000004
[    6.014127] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    6.014146] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    6.014165] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    6.014200] virtio-pci 0000:00:02.0: something else
[    6.014291] arm-smmu-v3 10000000.smmuv3: event 0x10 received:
[    6.014312] arm-smmu-v3 10000000.smmuv3: \t0x0000001000000010
[    6.014331] arm-smmu-v3 10000000.smmuv3: \t0x0000020800000000
[    6.014351] arm-smmu-v3 10000000.smmuv3: \t0x000000000dead000
[    6.014369] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
"""


def test_guest_event_reports_decode_to_the_records_the_guest_read() -> None:
    reports = guest_event_reports(DMESG)
    assert [r.event_id for r in reports] == [EventId.C_BAD_STE, EventId.F_TRANSLATION]
    bad_ste, translation = (decode_event(r.record()) for r in reports)
    assert bad_ste.sid == 0x18
    assert translation.sid == 0x10 and translation.fields["input_addr"] == 0xDEAD000


DMESG_7 = """\
[    2.584001] arm-smmu-v3 10000000.smmuv3: event 0x10 received:
[    2.584091] arm-smmu-v3 10000000.smmuv3: \t0x0000001000000010
[    2.584139] arm-smmu-v3 10000000.smmuv3: \t0x0000020800000000
[    2.584159] arm-smmu-v3 10000000.smmuv3: \t0x000000000dead000
[    2.584176] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    2.584259] arm-smmu-v3 10000000.smmuv3: event: F_TRANSLATION client: 0000:00:02.0 \
sid: 0x10 ssid: 0x0 iova: 0xdead000 ipa: 0x0
[    2.584335] arm-smmu-v3 10000000.smmuv3: unpriv data read s1 "Input address caused fault" \
stag: 0x0
[    3.100000] arm-smmu-v3 10000000.smmuv3: event 0x02 received:
[    3.100001] arm-smmu-v3 10000000.smmuv3: \t0x0001000000000002
[    3.100002] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    3.100003] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    3.100004] arm-smmu-v3 10000000.smmuv3: \t0x0000000000000000
[    3.100005] arm-smmu-v3 10000000.smmuv3: event: C_BAD_STREAMID client: (unassigned sid) \
sid: 0x10000 ssid: 0x0
"""
"""What Linux 7.3's driver printed (two events): raw dwords, then the decoded line."""


def test_guest_decoded_events_parse_the_newer_drivers_lines() -> None:
    events = guest_decoded_events(DMESG_7)
    assert [(e.name, e.client, e.sid, e.ssid) for e in events] == [
        (EventId.F_TRANSLATION.name, "0000:00:02.0", 0x10, 0),
        (EventId.C_BAD_STREAMID.name, UNASSIGNED_CLIENT, 0x10000, 0),
    ]
    assert (events[0].iova, events[0].ipa) == (0xDEAD000, 0)
    assert events[1].iova is None and events[1].fetch_addr is None
    # The raw dwords are still there and agree with the decoded lines.
    raw = [decode_event(r.record()) for r in guest_event_reports(DMESG_7)]
    assert [(e.name, e.sid) for e in raw] == [(e.name, e.sid) for e in events]


def test_guest_decoded_events_finds_none_in_a_612_log() -> None:
    assert guest_decoded_events(DMESG) == []


def test_smmu_node_maps_only_endpoint_rids() -> None:
    endpoints = (NestedEndpoint(slot=2), NestedEndpoint(slot=5, behind_root_port=True))
    node = smmu_node(NestedConfig(endpoints=endpoints))
    assert node.base == EXPECTED_SMMU_BAR
    assert node.spi == virt_intx_spi(SMMU_SLOT, 1)
    rids = [(e.rid_base, e.sid_base, e.length) for e in node.iommu_map]
    assert rids == [(pci_rid(0, 2), pci_rid(0, 2), 1), (pci_rid(1, 0), pci_rid(1, 0), 1)]
    assert pci_rid(0, SMMU_SLOT) not in [r for r, _, _ in rids]


def test_init_enables_the_smmu_function_before_reprobing_it() -> None:
    script = "".join(f.render() for f in init_fragments(NestedConfig()))
    enable = script.index(f"/sys/bus/pci/devices/0000:00:{SMMU_SLOT:02x}.0/enable")
    probe = script.index(f"echo {EXPECTED_SMMU_BAR:x}.smmuv3 > /sys/bus/platform/drivers_probe")
    assert enable < probe


def test_bar_line_needs_the_whole_address() -> None:
    assert BAR_LINE.search("VSMMU-SMMU-BAR 0x00") is None
    match = BAR_LINE.search("VSMMU-SMMU-BAR 0x0000000010000000 0x000000001001ffff 0x200\n")
    assert match is not None and int(match.group(1), 16) == EXPECTED_SMMU_BAR


def test_endpoint_spec_is_what_the_service_parses() -> None:
    endpoint = NestedEndpoint(slot=3, seed=9, ats=True)
    parsed = EndpointConfig.parse(endpoint.service_spec())
    assert parsed.sid == endpoint.sid == 3 << 3
    assert "ats=on" in parsed.spec and "seed=9" in parsed.spec and "name=rng3" in parsed.spec
    device = json.loads(endpoint.device_json(Path("/tmp/x.sock")))
    assert device["driver"] == "vfio-user-pci" and device["addr"] == "0x3"


def test_only_the_smmu_function_waits_for_its_register_writes() -> None:
    smmu = json.loads(smmu_function_device(Path("/tmp/smmu.sock")))
    assert smmu["driver"] == "vfio-user-pci" and smmu["addr"] == f"{SMMU_SLOT:#x}"
    assert smmu["x-no-posted-writes"] is True
    endpoint = json.loads(NestedEndpoint(slot=3).device_json(Path("/tmp/x.sock")))
    assert "x-no-posted-writes" not in endpoint
