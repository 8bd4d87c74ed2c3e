"""The sanitizer against the in-process Linux-like GuestDriver.

Each deliberately wrong sequence reports exactly its own kind; the correct
Linux sequences (reset, CD + STE install, hitless and V=0 updates, unmap
with TLBI + CMD_SYNC) report nothing.  The reference for "wrong" is the
SMMUv3 rule each test names, not the sanitizer's code.
"""

from __future__ import annotations

import dataclasses

import pytest

from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.cd import Cd, Tg0
from vsmmu.arch.commands import COMMAND_SIZE, CError, SyncCs
from vsmmu.arch.fields import words_from_bytes
from vsmmu.arch.pagetables import DESC, Ap
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.nesting import NestingTranslator
from vsmmu.sanitizer import GuestError, GuestErrorKind, SanitizedDmaPort, Sanitizer
from vsmmu.smmu import GuestRam, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
SID = 0x08
OTHER_SID = 0x10
CD_GPA = RAM_BASE + 0x8_0000
TTB = RAM_BASE + 0x9_0000
PAGE_A = RAM_BASE + 0x20_0000
PAGE_B = RAM_BASE + 0x30_0000
IOVA = 0x1000_0000
ASID = 7
IPS_48 = 5
T0SZ_48 = 16
LEAF = DESC.VALID.place(1) | DESC.AF.place(1) | DESC.AP.place(Ap.RW_ANY) | DESC.TYPE.place(1)


class TranslatorPort:
    """The endpoint DMA port the service gives an endpoint (translated by the sim)."""

    def __init__(self, translator: NestingTranslator, sid: int) -> None:
        self.translator, self.sid = translator, sid

    def read(self, iova: int, length: int) -> bytes:
        return self.translator.dma_read(self.sid, iova, length)

    def write(self, iova: int, data: bytes) -> None:
        self.translator.dma_write(self.sid, iova, data)


@dataclasses.dataclass
class Rig:
    ram: GuestRam
    smmu: SmmuV3
    driver: GuestDriver
    translator: NestingTranslator
    sanitizer: Sanitizer
    reports: list[GuestError]
    dma: SanitizedDmaPort
    idle: list[int]

    def kinds(self) -> list[str]:
        return [r.kind.value for r in self.reports]

    def put(self, gpa: int, value: int) -> None:
        self.ram.write(gpa, value.to_bytes(8, "little"))


def cd(**changes: int) -> Cd:
    fields = dict(v=1, aa64=1, t0sz=T0SZ_48, tg0=Tg0.GRANULE_4K, epd1=1, ips=IPS_48,
                  asid=ASID, ttb0=TTB)
    fields.update(changes)
    return Cd(**fields)


def s1_ste(**extra: int) -> Ste:
    fields: dict[str, int] = dict(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_GPA)
    fields.update(extra)
    return Ste(**fields)


def map_page(rig: Rig, iova: int, out: int) -> int:
    """4-level 4K tables for ``iova`` -> ``out``; returns the GPA of the leaf descriptor."""
    tables = [TTB + i * 0x1000 for i in range(4)]
    for level in range(3):
        index = (iova >> (39 - 9 * level)) & 0x1FF
        rig.put(tables[level] + index * 8,
                tables[level + 1] | DESC.VALID.place(1) | DESC.TYPE.place(1))
    leaf = tables[3] + ((iova >> 12) & 0x1FF) * 8
    rig.put(leaf, out | LEAF)
    return leaf


@pytest.fixture
def rig() -> Rig:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    sim = SimIommufd()
    translator = NestingTranslator(sim)
    smmu = SmmuV3(ram, translator)
    translator.bind(smmu)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    for sid in (SID, OTHER_SID):
        translator.add_endpoint(sid, sim.create_mock_device(sid), f"ep{sid:#x}")
    reports: list[GuestError] = []
    idle: list[int] = []
    sanitizer = Sanitizer(smmu, translator, reports.append, on_pending_sync=idle.append)
    sanitizer.enable()
    driver = GuestDriver(smmu, ram)
    driver.probe()
    driver.reset()
    dma = SanitizedDmaPort(TranslatorPort(translator, SID), sanitizer, SID)
    return Rig(ram, smmu, driver, translator, sanitizer, reports, dma, idle)


def install_s1(rig: Rig) -> None:
    """Linux's order: CD, CFGI_CD + SYNC; tables; STE, CFGI_STE + SYNC."""
    map_page(rig, IOVA, PAGE_A)
    rig.ram.write(CD_GPA, cd().encode())
    rig.driver.issue(encode_command(CmdOpcode.CFGI_CD, sid=SID, leaf=1))
    rig.driver.write_ste(SID, s1_ste())


def test_linux_sequences_report_nothing(rig: Rig) -> None:
    install_s1(rig)
    rig.ram.write(PAGE_A, b"A")
    assert rig.dma.read(IOVA, 1) == b"A"
    # Unmap + remap with TLBI_NH_VA + CMD_SYNC (strict mode), then DMA again.
    map_page(rig, IOVA, PAGE_B)
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_VA, asid=ASID, address=IOVA, leaf=1))
    rig.ram.write(PAGE_B, b"B")
    assert rig.dma.read(IOVA, 1) == b"B"
    # A hitless S1 -> bypass update, one double word per CFGI (arm_smmu_write_entry).
    bypass = Ste(v=1, config=SteConfig.BYPASS, shcfg=1)
    address = rig.driver.ste_address(SID)
    step1 = s1_ste(shcfg=1)  # SHCFG is unused by an S1 STE with S1DSS=terminate
    rig.ram.write(address, step1.encode())
    rig.driver.issue(encode_command(CmdOpcode.CFGI_STE, sid=SID, leaf=1))
    rig.ram.write(address, bypass.encode()[:8])  # the one critical double word
    rig.driver.issue(encode_command(CmdOpcode.CFGI_STE, sid=SID, leaf=1))
    rig.driver.write_ste(SID, bypass)
    # A change of two used double words goes through V=0 first.
    rig.driver.write_ste(SID, Ste(v=0))
    rig.driver.write_ste(SID, s1_ste(s1cir=1))
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID))
    assert rig.dma.read(IOVA, 1) == b"B"
    rig.sanitizer.queue_idle()
    assert rig.reports == []
    assert rig.sanitizer.summary()["total"] == 0


def test_stale_ste_dma_after_an_ste_write_without_cfgi(rig: Rig) -> None:
    install_s1(rig)
    rig.dma.read(IOVA, 1)
    # IHI 0070 §3.21: the new STE takes effect only after CFGI_STE; DMA still uses the old.
    rig.ram.write(rig.driver.ste_address(SID), Ste(v=1, config=SteConfig.BYPASS).encode())
    rig.dma.read(IOVA, 1)
    assert rig.kinds() == [GuestErrorKind.STALE_STE.value]
    assert rig.reports[0].sid == SID and rig.reports[0].iova == IOVA
    rig.dma.read(IOVA, 1)
    assert len(rig.reports) == 1, "one stale entry is reported once"


def test_stale_cd_dma_after_a_cd_write_without_cfgi_cd(rig: Rig) -> None:
    install_s1(rig)
    rig.dma.read(IOVA, 1)
    rig.ram.write(CD_GPA, cd(asid=ASID + 1).encode())
    rig.dma.read(IOVA, 1)
    assert rig.kinds() == [GuestErrorKind.STALE_CD.value]
    assert rig.reports[0].asid == ASID


def test_stale_translation_dma_after_a_remap_without_tlbi(rig: Rig) -> None:
    install_s1(rig)
    rig.dma.read(IOVA, 1)
    map_page(rig, IOVA, PAGE_B)  # the guest forgot TLBI_NH_VA
    rig.dma.read(IOVA, 1)
    assert rig.kinds() == [GuestErrorKind.STALE_TRANSLATION.value]
    error = rig.reports[0]
    assert (error.sid, error.asid, error.iova) == (SID, ASID, IOVA)
    # Unmapped without TLBI is stale too (a new page, so a new report).
    rig.put(map_page(rig, IOVA + 0x1000, PAGE_A), 0)
    rig.dma.read(IOVA, 1)
    assert len(rig.reports) == 1


def test_torn_ste_two_used_words_changed_between_cfgis(rig: Rig) -> None:
    install_s1(rig)
    # S1ContextPtr (dw0) and S1CIR (dw1) of a live STE rewritten between two CFGI_STEs.
    rig.ram.write(CD_GPA + 0x40, cd().encode())
    rig.driver.write_ste(SID, s1_ste(s1_context_ptr=CD_GPA + 0x40, s1cir=1))
    assert rig.kinds() == [GuestErrorKind.TORN_STE.value]
    error = rig.reports[0]
    assert error.sid == SID and error.index is not None
    new = s1_ste(s1_context_ptr=CD_GPA + 0x40, s1cir=1).encode()
    assert list(error.words[:2]) == words_from_bytes(new, 2)


def test_torn_cd_two_used_words_changed_between_cfgis(rig: Rig) -> None:
    install_s1(rig)
    rig.ram.write(CD_GPA, cd(asid=ASID + 1, ttb0=TTB + 0x4000).encode())
    rig.driver.issue(encode_command(CmdOpcode.CFGI_CD, sid=SID, leaf=1))
    assert rig.kinds() == [GuestErrorKind.TORN_CD.value]
    assert rig.reports[0].sid == SID and rig.reports[0].ssid == 0


def test_command_with_res0_bits(rig: Rig) -> None:
    # (An invalidation with RES0 bits goes to the host, which refuses it: CERROR_ILL.)
    bad = bytearray(encode_command(CmdOpcode.PREFETCH_CONFIG, sid=SID))
    bad[8] |= 0x20  # dw1 bit 5: PREFETCH_CONFIG has no field in dw1
    cons = rig.driver.issue(bytes(bad))
    assert rig.driver.cmdq_cons_error() == CError.NONE and cons
    assert rig.kinds() == [GuestErrorKind.RES0_COMMAND.value]
    assert rig.reports[0].index == rig.driver.cmdq_index_of(rig.driver.cmdq_prod) - 2


def test_invalidation_without_sync_before_the_queue_goes_idle(rig: Rig) -> None:
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID), sync=False)
    assert rig.idle, "the service is asked to check once the queue stays idle"
    rig.sanitizer.queue_idle(rig.idle[-1])
    assert rig.kinds() == [GuestErrorKind.MISSING_SYNC.value]
    assert rig.reports[0].index == rig.driver.cmdq_index_of(rig.driver.cmdq_prod) - 1


def test_a_later_command_cancels_the_stale_idle_check(rig: Rig) -> None:
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID), sync=False)
    first = rig.idle[-1]
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID))  # + CMD_SYNC
    rig.sanitizer.queue_idle(first)
    assert rig.reports == []


def test_event_queue_left_full(rig: Rig) -> None:
    size = 1 << rig.driver.layout.evtq_log2
    bad_sid = 0x20  # no STE: C_BAD_STE for every transaction
    for _ in range(size):
        rig.translator.transaction(bad_sid, IOVA)
    assert rig.reports == []
    rig.translator.transaction(bad_sid, IOVA)
    assert rig.kinds() == [GuestErrorKind.EVENTQ_FULL.value]
    assert rig.reports[0].sid == bad_sid
    events, overflowed = rig.driver.read_events()
    assert len(events) == size and overflowed


def test_off_costs_nothing_and_reports_nothing(rig: Rig) -> None:
    rig.sanitizer.disable()
    assert rig.smmu.observer is None
    install_s1(rig)
    rig.dma.inner.read(IOVA, 1)
    map_page(rig, IOVA, PAGE_B)
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ALL), sync=False)
    assert rig.reports == [] and rig.idle == []


def test_a_reset_and_cfgi_all_start_a_new_baseline(rig: Rig) -> None:
    install_s1(rig)
    # What the guest left unfinished before a reset is not held against the next one.
    rig.driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID), sync=False)
    rig.smmu.reset()
    rig.sanitizer.queue_idle()
    rig.ram.write(rig.driver.ste_address(SID), Ste(v=1, config=SteConfig.BYPASS,
                                                   shcfg=1).encode())
    rig.driver.probe()
    rig.driver.reset()
    # Nor is what a driver finds when it issues CFGI_ALL to (re)initialise.
    rig.ram.write(rig.driver.ste_address(SID), s1_ste(s1cir=1).encode())
    from vsmmu.arch.commands import encode_cfgi_all
    rig.driver.issue(encode_cfgi_all())
    assert rig.reports == []


def test_an_msi_completed_sync_counts_though_its_slot_is_overwritten(rig: Rig) -> None:
    # Linux's MSI-polled CMD_SYNC: the completion MSI goes to the SYNC's own slot, which
    # the SMMU overwrites (MSIData 0) once it has consumed it.
    driver = rig.driver
    sync_slot = driver.cmdq_base + driver.cmdq.index(driver.cmdq.increment(driver.cmdq_prod)) \
        * COMMAND_SIZE
    driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID),
                 encode_command(CmdOpcode.SYNC, cs=SyncCs.IRQ, msiaddr=sync_slot), sync=False)
    assert rig.ram.read(sync_slot, 4) == bytes(4), "the MSI landed in the SYNC's slot"
    rig.sanitizer.queue_idle()
    assert rig.reports == []


def test_a_verified_page_is_walked_again_when_any_table_on_its_path_changes(rig: Rig) -> None:
    install_s1(rig)
    for _ in range(3):  # verified once, then taken from the sanitizer's memory
        rig.dma.read(IOVA, 1)
    assert rig.reports == []
    # The level-1 descriptor now points at another (empty) level-2 table: nothing is
    # mapped any more, but the IOTLB still has the page (no TLBI).
    index = (IOVA >> 30) & 0x1FF
    rig.put(TTB + 0x1000 + index * 8, (TTB + 0x8000) | DESC.VALID.place(1)
            | DESC.TYPE.place(1))
    rig.dma.read(IOVA, 1)
    assert rig.kinds() == [GuestErrorKind.STALE_TRANSLATION.value]
