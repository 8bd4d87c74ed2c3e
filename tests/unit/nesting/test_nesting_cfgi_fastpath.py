"""Repeated CMD_CFGI_STE: unchanged STEs are not re-installed, every change still is.

The model reuses an STE lookup while the STE's bytes and address are
unchanged, and the translator then skips the install.  These tests pin what
the guest and the host must still see: a changed STE (any bit, or the same
bytes moved elsewhere by the level-1 descriptor) is re-read and re-attached,
a destroyed HWPT is re-allocated, and a refused vSTE keeps raising
C_BAD_STE on every CFGI_STE.
"""

from __future__ import annotations

from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.events import EventId
from vsmmu.arch.ste import STE, STE_SIZE, Eats, L1Std
from vsmmu.iommufd.backend import HostMapping, ObjType
from vsmmu.iommufd.sim import HostPersonality, SimDevice, SimHwptNested, SimIommufd
from vsmmu.nesting import NestingTranslator, VsteWords
from vsmmu.smmu import GuestRam, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import LINUX_STRTAB_SPLIT, GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
SID = 0x08
CD_A = RAM_BASE + 0x8_0000
CD_B = RAM_BASE + 0x9_0000
SPARE_L2 = RAM_BASE + 0x30_0000


class Rig:
    """Model + translator + sim with one endpoint, probed and reset by a Linux-like driver."""

    def __init__(self, features: SmmuFeatures | None = None,
                 personality: HostPersonality | None = None) -> None:
        self.ram = GuestRam(RAM_BASE, RAM_SIZE)
        self.sim = SimIommufd(personality or HostPersonality())
        self.translator = NestingTranslator(self.sim)
        self.smmu = SmmuV3(self.ram, self.translator, features or SmmuFeatures())
        self.translator.bind(self.smmu)
        self.translator.map_guest_ram(RAM_BASE, HostMapping(self.ram.data))
        self.dev = self.sim.create_mock_device(SID, name="ep")
        self.translator.add_endpoint(SID, self.dev, "ep")
        self.driver = GuestDriver(self.smmu, self.ram)
        self.driver.probe()
        self.driver.reset()

    def cfgi_ste(self) -> None:
        self.driver.issue(encode_command(CmdOpcode.CFGI_STE, sid=SID, leaf=1))

    def attached_vste(self) -> tuple[int, VsteWords]:
        """(HWPT id, vSTE) the endpoint's iommufd device is attached to."""
        dev = self.sim.object(self.dev)
        assert isinstance(dev, SimDevice) and isinstance(dev.hwpt, SimHwptNested)
        return dev.hwpt.id, VsteWords(*dev.hwpt.ste)

    def nested_count(self) -> int:
        return sum(o.type is ObjType.HWPT_NESTED for o in self.sim.objects())


def s1(cd: int, **extra: int) -> Ste:
    return Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=cd, **extra)


def test_unchanged_ste_keeps_its_hwpt_and_changes_reinstall() -> None:
    rig = Rig()
    rig.driver.write_ste(SID, s1(CD_A))
    hwpt_a, vste = rig.attached_vste()
    assert STE.S1CONTEXTPTR.get(vste.word0) == CD_A
    objects = rig.nested_count()
    for _ in range(3):
        rig.cfgi_ste()
    assert rig.attached_vste() == (hwpt_a, vste)
    assert rig.nested_count() == objects
    # A new context pointer: new vSTE, new HWPT, the old one destroyed.
    rig.driver.write_ste(SID, s1(CD_B))
    hwpt_b, vste_b = rig.attached_vste()
    assert hwpt_b != hwpt_a and vste_b != vste
    assert rig.sim.object(hwpt_a) is None
    # Back to A: allocated again (the first was destroyed), attached again.
    rig.driver.write_ste(SID, s1(CD_A))
    hwpt_a2, vste_a2 = rig.attached_vste()
    assert vste_a2 == vste and rig.sim.object(hwpt_a2) is not None
    assert rig.sim.object(hwpt_b) is None


def test_a_change_outside_the_vste_fields_is_still_read() -> None:
    rig = Rig()
    rig.driver.write_ste(SID, s1(CD_A))
    first = rig.translator.stream(SID)
    assert first is not None and first.lookup is not None
    before = first.lookup
    rig.driver.write_ste(SID, s1(CD_A, dw5=1))
    after = rig.translator.stream(SID)
    assert after is not None and after.lookup is not None
    assert after.lookup is not before and after.lookup.ste == s1(CD_A, dw5=1)


def test_same_bytes_at_a_new_address_are_looked_up_again() -> None:
    rig = Rig()
    rig.driver.write_ste(SID, s1(CD_A))
    stream = rig.translator.stream(SID)
    assert stream is not None and stream.lookup is not None
    old_address = stream.lookup.address
    # Copy the level-2 table elsewhere and point the level-1 descriptor at the copy.
    l1_index = SID >> LINUX_STRTAB_SPLIT
    old_table = rig.driver.ste_address(SID) - (SID % (1 << LINUX_STRTAB_SPLIT)) * STE_SIZE
    size = STE_SIZE << LINUX_STRTAB_SPLIT
    rig.ram.write(SPARE_L2, rig.ram.read(old_table, size))
    rig.driver.write_l1_descriptor(l1_index, L1Std(span=LINUX_STRTAB_SPLIT + 1, l2ptr=SPARE_L2))
    rig.cfgi_ste()
    assert stream.lookup.address != old_address
    assert stream.lookup.address == SPARE_L2 + (SID % (1 << LINUX_STRTAB_SPLIT)) * STE_SIZE


def test_refused_vste_raises_c_bad_ste_on_every_cfgi() -> None:
    rig = Rig(SmmuFeatures(ats=True), HostPersonality(ats_in_nested=False))
    rig.driver.write_ste(SID, s1(CD_A, eats=Eats.FULL))
    for _ in range(2):
        rig.cfgi_ste()
    events, _ = rig.driver.read_events()
    assert [(e.event_id, e.sid) for e in events] == [(EventId.C_BAD_STE, SID)] * 3
