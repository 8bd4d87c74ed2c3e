"""Host-side failures injected under the translator: what the guest sees, and no leak.

The backend is the sim wrapped in :class:`FaultInjectingBackend`; the guest is
the Linux-like GuestDriver.  Each outcome is the documented one (README "Fault
injection"): C_BAD_STE policy for a refused nested HWPT, CERROR_ILL at exactly
the failing command for a refused invalidation, a clean SMMU enable failure.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest

from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import CError
from vsmmu.arch.events import EventId
from vsmmu.arch.registers import GERROR
from vsmmu.iommufd.backend import HostMapping, IommufdError, ObjType
from vsmmu.iommufd.faults import BackendOp, FaultInjectingBackend
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.nesting import NestingTranslator
from vsmmu.smmu import GuestRam, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
SID = 0x08
CD_GPA = RAM_BASE + 0x8_0000


@dataclasses.dataclass
class Rig:
    sim: SimIommufd
    faults: FaultInjectingBackend
    translator: NestingTranslator
    smmu: SmmuV3
    driver: GuestDriver

    def types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for obj in self.sim.objects():
            counts[obj.type.value] = counts.get(obj.type.value, 0) + 1
        return counts


def make_rig(*, reset: bool = True) -> Rig:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    sim = SimIommufd()
    translator = NestingTranslator(sim)
    # As x-vsmmu-fail does: the wrapper goes in front of the translator's backend.
    faults = FaultInjectingBackend(sim)
    translator.backend = faults
    smmu = SmmuV3(ram, translator)
    translator.bind(smmu)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    translator.add_endpoint(SID, sim.create_mock_device(SID), "ep")
    driver = GuestDriver(smmu, ram)
    if reset:
        driver.probe()
        driver.reset()
    return Rig(sim, faults, translator, smmu, driver)


def s1_ste() -> Ste:
    return Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_GPA)


def test_invalidation_failure_at_entry_k_is_cerror_ill_at_that_command() -> None:
    rig = make_rig()
    rig.faults.arm(BackendOp.HWPT_INVALIDATE, errno.EINVAL, entry=2)
    before = rig.driver.cmdq_prod
    tlbi = encode_command(CmdOpcode.TLBI_NH_ASID, asid=1)
    rig.driver.issue(tlbi, tlbi, tlbi, tlbi)
    assert rig.smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask
    assert rig.driver.cmdq_cons_error() == CError.ILL
    assert rig.driver.cmdq_index_of(rig.driver.cmdq_cons_pointer()) == \
        rig.driver.cmdq_index_of(before) + 2
    assert rig.translator.invalidations == 1
    # Linux skips the bad command (replaced by a CMD_SYNC) and resumes: the rest succeeds.
    rig.driver.replace_command(rig.driver.cmdq_cons_pointer(),
                               encode_command(CmdOpcode.SYNC))
    rig.driver.acknowledge_gerror()
    assert rig.driver.cmdq_cons_pointer() == rig.driver.cmdq_prod
    assert rig.faults.armed() == {}


def test_short_batch_passes_and_keeps_the_failure_armed() -> None:
    rig = make_rig()
    rig.faults.arm(BackendOp.HWPT_INVALIDATE, errno.EIO, entry=3)
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ALL))
    assert not rig.smmu.active_errors()
    assert "hwpt_invalidate" in rig.faults.armed()


def test_refused_nested_hwpt_follows_the_c_bad_ste_policy_and_leaks_nothing() -> None:
    rig = make_rig()
    before = rig.types()
    rig.faults.arm(BackendOp.HWPT_ALLOC, errno.EIO)
    rig.driver.write_ste(SID, s1_ste())
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID)]
    # The stream sits on a V=0 vSTE (its transactions: C_BAD_STE); nothing else was added.
    assert rig.types() == {**before, "hwpt_nested": before["hwpt_nested"] + 1}
    assert_no_orphan(rig)
    assert not rig.smmu.active_errors()
    # Once the failure is used up, the same STE installs and the V=0 HWPT goes.
    rig.driver.write_ste(SID, s1_ste())
    assert rig.types() == {**before, "hwpt_nested": before["hwpt_nested"] + 1}
    assert_no_orphan(rig)
    stream = rig.translator.stream(SID)
    assert stream is not None and stream.vste is not None and stream.vste.word0 & 1


def assert_no_guest_objects(rig: Rig) -> None:
    """Only the service's own objects: IOAS, devices, no nest-parent S2, nothing nested."""
    assert set(rig.types()) <= {"ioas", "device", "hwpt_paging"}, rig.types()
    assert not [o for o in rig.sim.objects()
                if o.type is ObjType.HWPT_PAGING and o.detail.get("nest_parent")]


def assert_no_orphan(rig: Rig) -> None:
    """Every nested HWPT is a proxy or attached to a device."""
    guest = rig.translator.guest_objects
    assert guest is not None
    proxies = {h.id for h in guest.hwpts.values() if h.proxy}
    for obj in rig.sim.objects():
        if obj.type is ObjType.HWPT_NESTED:
            assert obj.id in proxies or obj.users, obj


@pytest.mark.parametrize("op", [BackendOp.HWPT_ALLOC, BackendOp.VIOMMU_ALLOC,
                                BackendOp.VEVENTQ_ALLOC])
def test_smmu_enable_fails_cleanly_and_the_next_enable_works(op: BackendOp) -> None:
    rig = make_rig(reset=False)
    rig.faults.arm(op, errno.ENOMEM)
    rig.driver.probe()
    rig.driver.reset()
    assert rig.smmu.enabled, "the guest's SMMUEN write is acknowledged"
    assert rig.translator.nesting_error and "ENOMEM" in rig.translator.nesting_error
    assert_no_guest_objects(rig)
    assert rig.translator.guest_object_ids() == set()
    rig.driver.write_ste(SID, Ste(v=1, config=SteConfig.BYPASS))
    result = rig.translator.transaction(SID, RAM_BASE)
    assert not result.ok and result.event is None, "DMA blocked, no event"
    assert not rig.smmu.active_errors(), "the CFGI_STE itself succeeds"
    rig.smmu.reset()
    rig.driver.probe()
    rig.driver.reset()
    assert rig.translator.nesting_error == ""
    assert {"viommu", "veventq", "vdevice", "hwpt_nested"} <= set(rig.types())


def test_refused_vdevice_leaves_the_stream_working_unforwarded_and_leaks_nothing() -> None:
    rig = make_rig(reset=False)
    rig.faults.arm(BackendOp.VDEVICE_ALLOC, errno.EEXIST)
    rig.driver.probe()
    rig.driver.reset()
    stream = rig.translator.stream(SID)
    assert stream is not None and stream.vdev_id is None
    assert "vdevice" not in rig.types()
    # Its STEs still install (the host attaches without a vDEVICE); its DMA works.
    rig.driver.write_ste(SID, Ste(v=1, config=SteConfig.BYPASS))
    assert rig.translator.transaction(SID, RAM_BASE).ok
    rig.smmu.reset()
    assert_no_guest_objects(rig)


def test_count_and_disarm() -> None:
    rig = make_rig()
    rig.faults.arm(BackendOp.DESTROY, errno.EBUSY, count=2)
    for _ in range(2):
        with pytest.raises(IommufdError) as info:
            rig.faults.destroy(12345)
        assert info.value.errno == errno.EBUSY
    with pytest.raises(IommufdError) as info:
        rig.faults.destroy(12345)
    assert info.value.errno == errno.ENOENT, "the third call reaches the sim"
    rig.faults.arm(BackendOp.IOAS_ALLOC, errno.ENOSPC, count=5)
    rig.faults.arm(BackendOp.IOAS_ALLOC, errno.ENOSPC, count=0)
    assert rig.faults.armed() == {}
    assert rig.faults.injected[BackendOp.DESTROY] == 2
    with pytest.raises(ValueError):
        rig.faults.arm(BackendOp.HWPT_ALLOC, errno.EIO, entry=1)
    assert [o.type for o in rig.sim.objects()].count(ObjType.IOAS) == 1
