"""End to end with no guest OS: our client plays QEMU, GuestDriver plays the guest.

Written once, run on two worlds with the same assertions:

* ``sim``: ``vsmmu serve --backend sim --endpoint iommu-testdev`` — the sim's
  physical SMMU translates the emulated ``iommu-testdev``'s DMA (here, every
  ``make test``);
* ``kernel``: ``vsmmu serve --backend kernel --endpoint vfio=<cdev>`` — a real
  ``iommu-testdev`` bound to ``vfio-pci`` in the host lane's L1, its DMA
  translated by L1's (QEMU's) SMMUv3 through the nested HWPT the real kernel
  built from our vSTE, faults reported through the real vEVENTQ.  These run
  inside the lane (``$VSMMU_HOST_LANE``);
  ``tests/host_lane/test_passthrough_on_kernel.py`` boots it and runs this
  file there.

Guest RAM is a memfd DMA-mapped into both functions; the stream table,
queues, CD and stage-1 tables are written into it by the guest driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmp_harness.client_vmm import RAM_BASE, ClientVmm
from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.cd import Cd, Tg0
from vsmmu.arch.commands import CError
from vsmmu.arch.events import Event, EventId
from vsmmu.arch.pagetables import GRANULE_4K, encode_page, encode_table
from vsmmu.arch.registers import Reg
from vsmmu.endpoints.iommu_testdev import Result, pattern_bytes
from vsmmu.iommufd.uapi import HwptAllocFlags
from vsmmu.smmu.guest_driver import GuestDriver

SID = 0x10
"""The endpoint's guest StreamID (00:02.0, as in the lane)."""
OTHER_SID = 0x20
"""A StreamID with no endpoint (and so no vDEVICE)."""
ASID = 1
CD_GPA = RAM_BASE + 0x10_0000
TTB_GPA = RAM_BASE + 0x20_0000
"""Four 4 KiB stage-1 tables, one per level, at TTB_GPA + level * 4 KiB."""
TARGET_GPA = RAM_BASE + 0x80_0000
IOVA = 0x12_3456_7000
OFFSET, LENGTH = 0x40, 64
VA_BITS = 48
LEVELS = 4
DESCRIPTOR = 8
AP_UNPRIVILEGED_RW = 1
SH_INNER = 3
MAIR_NORMAL_WB = 0xFF
IPS_48_BITS = 5
EVENT_TIMEOUT = 60.0
"""Seconds for a fault to come back (the kernel world goes through L1's SMMU interrupt)."""
GUEST_TYPES = {"hwpt_nested", "viommu", "vdevice", "veventq"}
"""Object types that exist only for the guest's SMMU configuration."""

IN_LANE = bool(os.environ.get("VSMMU_HOST_LANE"))
CDEVS = [c for c in os.environ.get("VSMMU_VFIO_CDEVS", "").split(",") if c]
WORLDS = ["kernel"] if IN_LANE else ["sim"]


class World:
    """A ``ClientVmm`` factory for one backend, and what differs between backends."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.vmms: list[ClientVmm] = []

    def vmm(self, *service_args: str) -> ClientVmm:
        """A started service with this world's endpoint at SID (closed after the test)."""
        workdir = self.workdir / f"vmm{len(self.vmms)}"
        workdir.mkdir()
        if self.name == "kernel":
            vmm = ClientVmm(workdir, f"vfio={CDEVS[0]}", sid=SID, backend="kernel",
                            service_args=service_args)
        else:
            vmm = ClientVmm(workdir, "iommu-testdev", sid=SID, service_args=service_args)
        vmm.__enter__()
        self.vmms.append(vmm)
        return vmm

    def readback(self, vmm: ClientVmm, gpa: int) -> int:
        """Where the device reads ``gpa`` back untranslated: guest- or host-physical."""
        return vmm.ram.host_physical(gpa) if self.name == "kernel" else gpa

    def close(self) -> None:
        for vmm in self.vmms:
            vmm.close()


@pytest.fixture(params=WORLDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(request.param, tmp_path)
    yield w
    w.close()


# -- the guest's side -------------------------------------------------------


def table_address(level: int) -> int:
    return TTB_GPA + level * GRANULE_4K.page_size


def descriptor_address(level: int, iova: int) -> int:
    return table_address(level) + GRANULE_4K.index(iova, level, VA_BITS) * DESCRIPTOR


def map_page(vmm: ClientVmm, iova: int, gpa: int) -> None:
    """Stage-1 4-level tables: ``iova``'s page → ``gpa``, unprivileged read/write."""
    for level in range(LEVELS - 1):
        vmm.ram.write(descriptor_address(level, iova),
                      encode_table(table_address(level + 1), GRANULE_4K).to_bytes(8, "little"))
    leaf = encode_page(gpa, GRANULE_4K, ap=AP_UNPRIVILEGED_RW, sh=SH_INNER)
    vmm.ram.write(descriptor_address(LEVELS - 1, iova), leaf.to_bytes(DESCRIPTOR, "little"))


def unmap_page(vmm: ClientVmm, iova: int) -> None:
    vmm.ram.write(descriptor_address(LEVELS - 1, iova), bytes(DESCRIPTOR))


def stage1_cd() -> Cd:
    """Linux's CD for a 48-bit, 4 KiB-granule address space; faults recorded (R) and aborted."""
    return Cd(v=1, aa64=1, t0sz=64 - VA_BITS, tg0=Tg0.GRANULE_4K, ir0=1, or0=1, sh0=SH_INNER,
              epd1=1, ips=IPS_48_BITS, affd=1, r=1, a=1, aset=1, asid=ASID, ttb0=TTB_GPA,
              mair=MAIR_NORMAL_WB)


def stage1_ste() -> Ste:
    return Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_GPA, s1cir=1, s1cor=1,
               s1csh=SH_INNER)


def stage1_vste() -> list[str]:
    """The vSTE the host must get: the STE's first two words (every field set is one the
    kernel's STRTAB_STE_{0,1}_NESTING_ALLOWED keeps), as VSMMU_HWPT_ALLOC prints them."""
    raw = stage1_ste().encode()
    return [f"{int.from_bytes(raw[i:i + 8], 'little'):#018x}" for i in (0, 8)]


def enable(vmm: ClientVmm) -> GuestDriver:
    """Probe and reset the SMMU as Linux does (SMMUEN=1 at the end)."""
    vmm.driver = GuestDriver(vmm.driver.smmu, vmm.ram)
    vmm.driver.probe()
    vmm.driver.reset()
    return vmm.driver


def install_stage1(vmm: ClientVmm) -> None:
    """CD, tables for IOVA → TARGET_GPA, the STE, CMD_CFGI_STE + CMD_SYNC."""
    vmm.ram.write(CD_GPA, stage1_cd().encode())
    map_page(vmm, IOVA, TARGET_GPA)
    vmm.driver.write_ste(SID, stage1_ste())


def dma(world: World, vmm: ClientVmm) -> Result | int:
    return vmm.testdev.dma(IOVA + OFFSET, LENGTH, world.readback(vmm, TARGET_GPA + OFFSET))


def wait_for_event(vmm: ClientVmm, found: Callable[[Event], bool]) -> list[Event]:
    """Drain the guest event queue until an event ``found`` accepts arrives."""
    seen: list[Event] = []
    deadline = time.monotonic() + EVENT_TIMEOUT
    while time.monotonic() < deadline:
        events, _ = vmm.driver.read_events()
        seen += events
        if any(found(e) for e in events):
            return seen
        time.sleep(0.05)
    raise AssertionError(vmm.report(f"no such event in the guest queue; saw {seen}"))


def guest_objects_held(vmm: ClientVmm) -> list[dict[str, object]]:
    """Rows of the service's object table that exist only for the guest's configuration.

    The IOAS and the bound device are the service's own; attaching the device
    to the IOAS (GBPA bypass) makes the kernel create a paging HWPT of its own,
    which the sim lists and the kernel backend does not; the nest parent is the
    guest's.
    """
    rows: list[dict[str, object]] = vmm.service("query-vsmmu-iommufd")
    nest_parent = int(HwptAllocFlags.NEST_PARENT)
    return [row for row in rows if row["type"] in GUEST_TYPES or (
        row["type"] == "hwpt_paging" and (row["detail"].get("nest_parent")
                                          or int(row["detail"].get("flags") or 0) & nest_parent))]


def wait_until(vmm: ClientVmm, what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(vmm.report(f"timed out waiting for {what}"))
        time.sleep(0.05)


# -- the scenarios ------------------------------------------------------------


def test_dma_lands_at_the_gpa_the_guest_stage1_names(world: World) -> None:
    vmm = world.vmm()
    enable(vmm)
    since = len(vmm.events.events)
    install_stage1(vmm)
    alloc = vmm.wait_event("VSMMU_HWPT_ALLOC", since=since,
                           match={"sid": SID, "errno": None, "vste": stage1_vste()})
    assert alloc["data"]["hwpt-id"] is not None
    (stream,) = vmm.service("query-vsmmu-streams", {"sid": SID})
    assert stream["attached-to"] == f"nested HWPT {alloc['data']['hwpt-id']}"

    assert dma(world, vmm) == Result.OK, vmm.report("DMA through the nested HWPT failed")
    assert vmm.ram.read(TARGET_GPA + OFFSET, LENGTH) == pattern_bytes(LENGTH)
    assert vmm.ram.read(TARGET_GPA, OFFSET) == bytes(OFFSET)


def test_unmapped_page_faults_with_the_guest_sid_through_the_veventq(world: World) -> None:
    vmm = world.vmm()
    enable(vmm)
    install_stage1(vmm)
    assert dma(world, vmm) == Result.OK  # the translation is now cached: the TLBI matters
    unmap_page(vmm, IOVA)
    vmm.driver.issue(encode_command(CmdOpcode.TLBI_NH_VA, asid=ASID, address=IOVA, leaf=1))
    since = len(vmm.events.events)

    assert dma(world, vmm) == Result.TX_FAIL
    events = wait_for_event(vmm, lambda e: e.event_id == EventId.F_TRANSLATION)
    fault = next(e for e in events if e.event_id == EventId.F_TRANSLATION)
    assert fault.sid == SID
    assert fault.fields["input_addr"] == IOVA + OFFSET
    forwarded = vmm.wait_event("VSMMU_EVENT", since=since,
                               match={"type": "F_TRANSLATION", "origin": "veventq"})
    assert forwarded["data"]["sid"] == SID

    # The queue stays watched once drained: the kernel's read of an empty vEVENTQ returns
    # 0 bytes (eventq.c), which is no end of file, so a later fault comes through too.
    since = len(vmm.events.events)
    assert dma(world, vmm) == Result.TX_FAIL
    again = vmm.wait_event("VSMMU_EVENT", since=since,
                           match={"type": "F_TRANSLATION", "origin": "veventq"})
    assert again["data"]["sid"] == SID


def test_host_refused_vste_is_reported_per_the_cbadste_event_policy(world: World) -> None:
    # No legal guest STE makes the real kernel refuse its vSTE (the translator sends only
    # the fields the kernel allows), so the refusal is injected where the translator calls
    # the backend: the same EIO the kernel returns, taking the same path.
    vmm = world.vmm()
    enable(vmm)
    vmm.service("x-vsmmu-fail", {"op": "hwpt_alloc", "errno": "EIO", "count": 1})
    since = len(vmm.events.events)
    install_stage1(vmm)

    refused = vmm.wait_event("VSMMU_HWPT_ALLOC", since=since,
                             match={"sid": SID, "errno": "EIO"})
    assert refused["data"]["vste"] == stage1_vste()
    events = wait_for_event(vmm, lambda e: e.event_id == EventId.C_BAD_STE)
    assert [e.sid for e in events if e.event_id == EventId.C_BAD_STE] == [SID]
    assert vmm.driver.cmdq_cons_error() == CError.NONE
    assert dma(world, vmm) == Result.TX_FAIL  # an abort vSTE is installed in its place


def test_host_refused_vste_is_cerror_ill_with_the_qemu_accel_policy(world: World) -> None:
    vmm = world.vmm("--cbadste-policy", "qemu-accel")
    driver = enable(vmm)
    vmm.service("x-vsmmu-fail", {"op": "hwpt_alloc", "errno": "EIO", "count": 1})
    cfgi_index = driver.cmdq_index_of(driver.cmdq_prod)
    install_stage1(vmm)

    assert driver.cmdq_cons_error() == CError.ILL
    assert driver.cmdq_index_of(driver.cmdq_cons_pointer()) == cfgi_index
    cerror = vmm.wait_event("VSMMU_CERROR")
    assert (cerror["data"]["error"], cerror["data"]["index"]) == ("ILL", cfgi_index)


def test_refused_invalidation_is_cerror_ill_at_its_index(world: World) -> None:
    vmm = world.vmm()
    driver = enable(vmm)
    install_stage1(vmm)
    first = driver.cmdq_index_of(driver.cmdq_prod)
    # CFGI_CD for a StreamID with no vDEVICE: the host cannot map the vSID (EIO at entry 1).
    driver.issue(encode_command(CmdOpcode.TLBI_NH_ASID, asid=ASID),
                 encode_command(CmdOpcode.CFGI_CD, sid=OTHER_SID, leaf=1),
                 encode_command(CmdOpcode.TLBI_NH_ALL))

    assert driver.cmdq_cons_error() == CError.ILL
    assert driver.cmdq_index_of(driver.cmdq_cons_pointer()) == first + 1
    cerror = vmm.wait_event("VSMMU_CERROR")
    assert (cerror["data"]["error"], cerror["data"]["index"]) == ("ILL", first + 1)


def test_commands_before_a_refused_one_have_taken_effect(world: World) -> None:
    # IHI 0070 §7.1 (CERROR_ILL): the commands before CMDQ_CONS have been consumed. The
    # kernel (arm_vsmmu_cache_invalidate) issues the commands it converted in blocks of 63
    # and reports entry_num = index of the refused one even when the block holding that
    # prefix was never issued; the TLBI before the bad command must still take effect.
    vmm = world.vmm()
    driver = enable(vmm)
    install_stage1(vmm)
    assert dma(world, vmm) == Result.OK  # the translation is now cached
    unmap_page(vmm, IOVA)
    start = driver.cmdq_prod
    driver.issue(encode_command(CmdOpcode.TLBI_NH_VA, asid=ASID, address=IOVA, leaf=1),
                 encode_command(CmdOpcode.CFGI_CD, sid=OTHER_SID, leaf=1))
    assert driver.cmdq_cons_error() == CError.ILL
    assert driver.cmdq_index_of(driver.cmdq_cons_pointer()) == driver.cmdq_index_of(start) + 1
    # As Linux does: the bad command becomes a CMD_SYNC, GERROR acknowledged, the queue runs.
    driver.replace_command(driver.cmdq_cons_pointer(), encode_command(CmdOpcode.SYNC))
    driver.acknowledge_gerror()
    assert driver.cmdq_cons_pointer() == driver.cmdq_prod

    assert dma(world, vmm) == Result.TX_FAIL, vmm.report("the TLBI before the refused "
                                                          "command left a stale translation")


def test_disable_reset_and_disconnect_leave_no_guest_object(world: World) -> None:
    vmm = world.vmm()
    enable(vmm)
    install_stage1(vmm)
    assert dma(world, vmm) == Result.OK
    assert set(vmm.object_types()) >= GUEST_TYPES

    vmm.driver.write32(Reg.CR0, 0)  # SMMU disable
    assert vmm.driver.read32(Reg.CR0ACK) == 0
    assert vmm.service("query-vsmmu")["guest-objects"] == []
    assert guest_objects_held(vmm) == []

    enable(vmm)
    install_stage1(vmm)
    assert set(vmm.object_types()) >= GUEST_TYPES
    vmm.smmu.reset()  # QEMU's system reset: DEVICE_RESET of the SMMU function
    assert vmm.service("query-vsmmu")["guest-objects"] == []
    assert guest_objects_held(vmm) == []

    enable(vmm)
    install_stage1(vmm)
    vmm.disconnect()
    wait_until(vmm, "the guest objects to go", lambda: not guest_objects_held(vmm)
               and not vmm.service("query-vsmmu")["guest-objects"])
    if world.name == "kernel":
        # The device was unbound: the kernel lets anyone bind it afresh.
        from vsmmu.iommufd.kernel import KernelIommufd

        wait_until(vmm, "the device to be unbound", lambda: "device" not in vmm.object_types())
        fresh = KernelIommufd()
        try:
            assert fresh.bind_vfio_cdev(CDEVS[0]) > 0
        finally:
            fresh.close()

    vmm.connect()  # the next VMM: bound again, and DMA works as before
    enable(vmm)
    install_stage1(vmm)
    vmm.ram.write(TARGET_GPA + OFFSET, bytes(LENGTH))
    assert dma(world, vmm) == Result.OK
    assert vmm.ram.read(TARGET_GPA + OFFSET, LENGTH) == pattern_bytes(LENGTH)
