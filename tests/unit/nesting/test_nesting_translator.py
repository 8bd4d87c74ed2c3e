"""The translator replayed with Linux driver sequences against model + sim backend.

Every test asserts on what a user can see: the backend's object table and the
guest's event queue / command queue registers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno

import pytest

from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import CError
from vsmmu.arch.events import Event, EventId
from vsmmu.arch.registers import GBPA, GERROR, Reg
from vsmmu.arch.ste import Eats
from vsmmu.iommufd.backend import DmaFault, HostMapping, IommufdError, ObjType
from vsmmu.iommufd.sim import HostPersonality, SimIommufd
from vsmmu.iommufd.uapi import VSTE_WORD0_ALLOWED, VSTE_WORD1_ALLOWED
from vsmmu.nesting import (
    ABORT_VSTE,
    BYPASS_VSTE,
    INVALID_VSTE,
    CBadStePolicy,
    NestingTranslator,
    StreamFault,
    TranslatorObserver,
    VsteWords,
    vste_for,
)
from vsmmu.smmu import GuestRam, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver, GuestLayout

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
ENDPOINT_SIDS = (0x08, 0x10)


class RecordingObserver(TranslatorObserver):
    """Keeps every observer call for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[Event, bool, str]] = []
        self.overflows: list[str] = []
        self.allocs: list[tuple[int, VsteWords, int | None, IommufdError | None]] = []

    def event_recorded(self, event: Event, written: bool, origin: str) -> None:
        self.events.append((event, written, origin))

    def event_overflow(self, origin: str) -> None:
        self.overflows.append(origin)

    def hwpt_allocated(self, sid: int, vste: VsteWords, hwpt_id: int | None,
                       error: IommufdError | None) -> None:
        self.allocs.append((sid, vste, hwpt_id, error))


@dataclasses.dataclass
class Rig:
    """Model + translator + sim + a Linux-like driver, with endpoints at ENDPOINT_SIDS."""

    ram: GuestRam
    sim: SimIommufd
    translator: NestingTranslator
    smmu: SmmuV3
    driver: GuestDriver
    observer: RecordingObserver
    devs: dict[int, int]


def make_rig(*, features: SmmuFeatures | None = None,
             personality: HostPersonality | None = None,
             policy: CBadStePolicy = CBadStePolicy.EVENT,
             layout: GuestLayout | None = None, reset: bool = True) -> Rig:
    """Build the rig; with ``reset`` the driver has probed and reset (SMMU enabled)."""
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    sim = SimIommufd(personality or HostPersonality())
    observer = RecordingObserver()
    translator = NestingTranslator(sim, policy=policy, observer=observer)
    smmu = SmmuV3(ram, translator, features or SmmuFeatures())
    translator.bind(smmu)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    devs = {}
    for sid in ENDPOINT_SIDS:
        devs[sid] = sim.create_mock_device(sid, name=f"ep{sid:#x}")
        translator.add_endpoint(sid, devs[sid], f"ep{sid:#x}")
    driver = GuestDriver(smmu, ram, layout)
    if reset:
        driver.probe()
        driver.reset()
    return Rig(ram, sim, translator, smmu, driver, observer, devs)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


SID_A, SID_B = ENDPOINT_SIDS
CD_TABLE = RAM_BASE + 0x8_0000


def rows(rig: Rig, kind: ObjType) -> list[dict[str, object]]:
    return [dict(o.detail, id=o.id) for o in rig.sim.objects() if o.type is kind]


def dev_row(rig: Rig, sid: int) -> dict[str, object]:
    return next(r for r in rows(rig, ObjType.DEVICE) if r["sid"] == sid)


def nested_by_id(rig: Rig) -> dict[int, tuple[int, int]]:
    return {int(str(r["id"])): (int(str(r["ste0"]), 16), int(str(r["ste1"]), 16))
            for r in rows(rig, ObjType.HWPT_NESTED)}


def s1_ste(**extra: int) -> Ste:
    return Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_TABLE, **extra)


def cmdq_error(rig: Rig) -> tuple[int, int]:
    """(CERROR code, failing command's queue index) while CMDQ_ERR is active, else (0, -1)."""
    if not rig.smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask:
        return 0, -1
    return rig.driver.cmdq_cons_error(), rig.driver.cmdq_index_of(rig.driver.cmdq_cons_pointer())


def test_enable_builds_s2_viommu_veventq_proxies_and_vdevices(rig: Rig) -> None:
    ioas = rows(rig, ObjType.IOAS)
    assert len(ioas) == 1 and ioas[0]["mappings"] == 1
    (s2,) = [r for r in rows(rig, ObjType.HWPT_PAGING) if r["nest_parent"]]
    (viommu,) = rows(rig, ObjType.VIOMMU)
    assert viommu["hwpt"] == s2["id"]
    (veventq,) = rows(rig, ObjType.VEVENTQ)
    assert veventq["viommu"] == viommu["id"]
    assert veventq["depth"] == 1 << GuestLayout().evtq_log2
    vdevs = {r["virt_id"]: r["dev"] for r in rows(rig, ObjType.VDEVICE)}
    assert vdevs == {sid: rig.devs[sid] for sid in ENDPOINT_SIDS}
    stes = set(nested_by_id(rig).values())
    assert tuple(ABORT_VSTE) in stes and tuple(BYPASS_VSTE) in stes
    # Linux leaves the endpoints' level-1 descriptors empty: the streams abort silently.
    abort_id = rig.translator.guest_objects.hwpts[ABORT_VSTE].id  # type: ignore[union-attr]
    assert all(dev_row(rig, sid)["hwpt"] == abort_id for sid in ENDPOINT_SIDS)


def test_cfgi_ste_translate_allocates_nested_hwpt_and_shares_identical_vste(rig: Rig) -> None:
    before = set(nested_by_id(rig))
    rig.driver.write_ste(SID_A, s1_ste(s1cir=1, s1cor=1, s1csh=3, memattr=0xF, shcfg=1))
    (new_id,) = set(nested_by_id(rig)) - before
    w0, w1 = nested_by_id(rig)[new_id]
    guest = rig.smmu.lookup_ste(SID_A)
    assert (w0, w1) == tuple(vste_for(guest))
    assert w0 & ~VSTE_WORD0_ALLOWED == 0 and w1 & ~VSTE_WORD1_ALLOWED == 0
    assert w1 != 0, "S1CIR/S1COR/S1CSH carried over"
    assert dev_row(rig, SID_A)["hwpt"] == new_id
    # The second endpoint with the identical STE reuses the HWPT.
    rig.driver.write_ste(SID_B, s1_ste(s1cir=1, s1cor=1, s1csh=3, memattr=0xF, shcfg=1))
    assert set(nested_by_id(rig)) - before == {new_id}
    assert dev_row(rig, SID_B)["hwpt"] == new_id
    # A changed STE gets its own HWPT; the old one lives while SID_B uses it.
    rig.driver.write_ste(SID_A, s1_ste(s1cir=2))
    assert new_id in nested_by_id(rig) and dev_row(rig, SID_A)["hwpt"] != new_id
    rig.driver.write_ste(SID_B, Ste(v=1, config=SteConfig.BYPASS))
    assert new_id not in nested_by_id(rig), "unused nested HWPT released"
    bypass_id = rig.translator.guest_objects.hwpts[BYPASS_VSTE].id  # type: ignore[union-attr]
    assert dev_row(rig, SID_B)["hwpt"] == bypass_id


def test_cfgi_all_and_range_reinstall_every_endpoint_in_range(rig: Rig) -> None:
    for sid in ENDPOINT_SIDS:
        rig.ram.write(rig.driver.ste_address(sid), Ste(v=1, config=SteConfig.BYPASS).encode())
    rig.driver.issue(encode_command(CmdOpcode.CFGI_STE_RANGE, sid=SID_A, range=3))
    bypass_id = rig.translator.guest_objects.hwpts[BYPASS_VSTE].id  # type: ignore[union-attr]
    assert dev_row(rig, SID_A)["hwpt"] == bypass_id
    assert dev_row(rig, SID_B)["hwpt"] != bypass_id, "SID 0x10 is outside 0x8..0xf"
    from vsmmu.arch.commands import encode_cfgi_all
    rig.driver.issue(encode_cfgi_all())
    assert dev_row(rig, SID_B)["hwpt"] == bypass_id


def test_bypass_stream_dma_reaches_guest_ram_at_the_same_address(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, Ste(v=1, config=SteConfig.BYPASS))
    rig.ram.write(RAM_BASE + 0x1000, b"guest!")
    assert rig.translator.dma_read(SID_A, RAM_BASE + 0x1000, 6) == b"guest!"
    rig.translator.dma_write(SID_A, RAM_BASE + 0x2000, b"dev")
    assert rig.ram.read(RAM_BASE + 0x2000, 3) == b"dev"


def test_abort_stream_aborts_silently(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, Ste(v=1, config=SteConfig.ABORT))
    result = rig.translator.transaction(SID_A, RAM_BASE)
    assert not result.ok and result.event is None
    assert rig.driver.read_events() == ([], False)


def test_invalid_ste_transaction_yields_c_bad_ste_with_the_guest_sid(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, Ste(v=0))
    assert dev_row(rig, SID_A)["hwpt"] in {
        i for i, words in nested_by_id(rig).items() if words == tuple(INVALID_VSTE)}
    try:
        rig.translator.dma_read(SID_A, RAM_BASE, 4)
    except StreamFault as fault:
        assert fault.result.event is not None
    else:
        raise AssertionError("DMA on a V=0 STE must fault")
    events, overflow = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID_A)]
    assert not overflow
    assert rig.observer.events[-1][0].event_id == EventId.C_BAD_STE


def test_illegal_ste_transaction_yields_c_bad_ste() -> None:
    rig = make_rig()
    # Stage 2 is not advertised: ILLEGAL.
    rig.driver.write_ste(SID_A, Ste(v=1, config=SteConfig.S2_TRANS))
    assert cmdq_error(rig) == (0, -1), "the default policy keeps the queue running"
    assert rig.translator.transaction(SID_A, RAM_BASE).event is not None
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID_A)]


def test_host_eio_default_policy_installs_abort_and_writes_c_bad_ste() -> None:
    rig = make_rig(features=SmmuFeatures(ats=True),
                   personality=HostPersonality(ats_in_nested=False))
    rig.driver.write_ste(SID_A, s1_ste(eats=Eats.FULL))
    assert cmdq_error(rig) == (0, -1)
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID_A)]
    sid, _vste, hwpt_id, error = rig.observer.allocs[-2]
    assert sid == SID_A and hwpt_id is None and error is not None and error.errno == errno.EIO
    invalid = {i for i, w in nested_by_id(rig).items() if w == tuple(INVALID_VSTE)}
    assert dev_row(rig, SID_A)["hwpt"] in invalid
    # Later transactions keep reporting C_BAD_STE (the installed abort is V=0).
    rig.translator.transaction(SID_A, RAM_BASE)
    events, _ = rig.driver.read_events()
    assert [e.event_id for e in events] == [EventId.C_BAD_STE]


def test_host_eio_qemu_accel_policy_is_cerror_ill_at_the_cfgi_ste() -> None:
    rig = make_rig(features=SmmuFeatures(ats=True),
                   personality=HostPersonality(ats_in_nested=False),
                   policy=CBadStePolicy.QEMU_ACCEL)
    start = rig.driver.cmdq_prod
    rig.driver.write_ste(SID_A, s1_ste(eats=Eats.FULL))
    assert cmdq_error(rig) == (CError.ILL, rig.driver.cmdq_index_of(start))
    assert rig.driver.read_events() == ([], False)
    abort_id = rig.translator.guest_objects.hwpts[ABORT_VSTE].id  # type: ignore[union-attr]
    assert dev_row(rig, SID_A)["hwpt"] == abort_id


def test_transaction_beyond_the_stream_table_is_c_bad_streamid(rig: Rig) -> None:
    # SID 0x300's level-1 descriptor has Span=0 (Linux never populated it).
    result = rig.translator.transaction(0x300, RAM_BASE, ssid=5)
    assert result.event is not None and result.event.event_id == EventId.C_BAD_STREAMID
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid, e.fields.get("ssid")) for e in events] == [
        (EventId.C_BAD_STREAMID, 0x300, 5)]
    # An endpoint whose level-1 descriptor is empty: the translator, not the host, reports it.
    result = rig.translator.transaction(SID_A, RAM_BASE)
    assert result.event is not None and result.event.event_id == EventId.C_BAD_STREAMID


def test_transaction_on_non_endpoint_invalid_ste_is_c_bad_ste(rig: Rig) -> None:
    rig.ram.write(rig.driver.ste_address(0x20), Ste(v=0).encode())
    result = rig.translator.transaction(0x20, RAM_BASE, write=True)
    assert result.event is not None and result.event.event_id == EventId.C_BAD_STE
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, 0x20)]


def test_partial_invalidation_failure_is_cerror_ill_at_exactly_that_command(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, s1_ste())
    start = rig.driver.cmdq_prod
    commands = [
        encode_command(CmdOpcode.TLBI_NH_VA, asid=1, address=0x1000),
        encode_command(CmdOpcode.CFGI_CD, sid=SID_A),
        encode_command(CmdOpcode.CFGI_CD, sid=0x99),     # no vDEVICE: the host says EIO
        encode_command(CmdOpcode.TLBI_NH_ASID, asid=1),
    ]
    rig.driver.issue(*commands)
    assert cmdq_error(rig) == (CError.ILL, rig.driver.cmdq_index_of(start + 2))
    # Linux replaces the bad command by a SYNC and acknowledges: the rest then runs.
    rig.driver.replace_command(start + 2, encode_command(CmdOpcode.SYNC))
    rig.driver.acknowledge_gerror()
    assert cmdq_error(rig) == (0, -1)
    assert rig.driver.cmdq_cons_pointer() == rig.driver.cmdq_prod


def test_veventq_overflow_becomes_guest_queue_overflow() -> None:
    rig = make_rig(layout=GuestLayout(evtq_log2=2))
    rig.driver.write_ste(SID_A, Ste(v=0))
    (veventq,) = rows(rig, ObjType.VEVENTQ)
    assert veventq["depth"] == 4
    for _ in range(6):       # DMA straight at the host: the vEVENTQ fills up undrained
        with contextlib.suppress(DmaFault):
            rig.sim.dma_read(rig.devs[SID_A], RAM_BASE, 4)
    assert rig.translator.drain_veventq() == 4
    events, overflow = rig.driver.read_events()
    assert len(events) == 4 and overflow
    assert rig.observer.overflows == ["veventq"]


async def test_veventq_is_read_on_the_event_loop() -> None:
    ram = GuestRam(RAM_BASE, 1 << 22)
    sim = SimIommufd()
    observer = RecordingObserver()
    translator = NestingTranslator(sim, observer=observer, loop=asyncio.get_running_loop())
    smmu = SmmuV3(ram, translator)
    translator.bind(smmu)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    dev = sim.create_mock_device(SID_A)
    translator.add_endpoint(SID_A, dev, "ep")
    driver = GuestDriver(smmu, ram)
    driver.probe()
    driver.reset()
    driver.write_ste(SID_A, Ste(v=0))
    with contextlib.suppress(DmaFault):
        sim.dma_read(dev, RAM_BASE, 4)
    for _ in range(50):
        if observer.events:
            break
        await asyncio.sleep(0.01)
    events, _ = driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID_A)]
    translator.close()
    assert [o.type for o in sim.objects()] == [ObjType.DEVICE]


def test_disable_destroys_every_guest_object_and_gbpa_decides(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, s1_ste())
    rig.driver.write_ste(SID_B, Ste(v=0))
    assert rig.translator.guest_object_ids()
    before = {o.id for o in rig.sim.objects()}
    guest_ids = rig.translator.guest_object_ids()
    rig.driver.write32(Reg.CR0, 0)
    assert not rig.translator.guest_object_ids()
    left = {o.type for o in rig.sim.objects()}
    assert left <= {ObjType.IOAS, ObjType.DEVICE, ObjType.HWPT_PAGING}
    reused = {o.id for o in rig.sim.objects() if o.type is ObjType.HWPT_PAGING}
    assert not (guest_ids & before - reused & {o.id for o in rig.sim.objects()})
    assert not any(r["nest_parent"] for r in rows(rig, ObjType.HWPT_PAGING))
    # GBPA.ABORT=0 (reset value): endpoints bypass to guest RAM.
    rig.ram.write(RAM_BASE + 0x3000, b"bypass")
    assert rig.translator.dma_read(SID_A, RAM_BASE + 0x3000, 6) == b"bypass"
    rig.driver.update_gbpa(GBPA.ABORT.place(1), 0)
    assert all(dev_row(rig, sid)["hwpt"] is None for sid in ENDPOINT_SIDS)
    result = rig.translator.transaction(SID_A, RAM_BASE + 0x3000)
    assert not result.ok and result.event is None
    assert not rows(rig, ObjType.HWPT_PAGING), "no paging HWPT left while blocked"


def test_reset_destroys_every_guest_object_and_reenable_rebuilds(rig: Rig) -> None:
    rig.driver.write_ste(SID_A, s1_ste())
    rig.smmu.reset()
    assert not rig.translator.guest_object_ids()
    assert {o.type for o in rig.sim.objects()} <= {ObjType.IOAS, ObjType.DEVICE,
                                                   ObjType.HWPT_PAGING}
    assert not rows(rig, ObjType.VEVENTQ) and not rows(rig, ObjType.VIOMMU)
    rig.driver.reset()
    assert len(rows(rig, ObjType.VIOMMU)) == 1 and len(rows(rig, ObjType.VDEVICE)) == 2


def test_host_without_nesting_blocks_endpoints_and_says_why() -> None:
    rig = make_rig(personality=HostPersonality(nesting=False))
    assert "NEST_PARENT" in rig.translator.nesting_error
    assert not rig.translator.guest_object_ids()
    assert all(dev_row(rig, sid)["hwpt"] is None for sid in ENDPOINT_SIDS)
    rig.driver.write_ste(SID_A, s1_ste())
    assert cmdq_error(rig) == (0, -1)
