"""The service in-process, driven like QEMU does (vfio-user) and like a harness does (QMP).

A guest is played by the test: guest RAM is a memfd handed over in DMA_MAP,
registers are written through REGION_WRITE on BAR 0, STEs and commands are
written into the memfd.  Assertions are made on what QMP reports (object
table, streams, events) and on the registers the guest reads back.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

import vsmmu.diagnostics
from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import COMMAND_SIZE, CError, SyncCs
from vsmmu.arch.events import EVENT_SIZE, EventId, decode_event
from vsmmu.arch.registers import (
    CMDQ_CONS,
    CR0,
    GERROR,
    QUEUE_BASE,
    STRTAB_BASE_CFG,
    QueueIndex,
    Reg,
    StrtabFmt,
)
from vsmmu.arch.ste import STE_SIZE, Eats
from vsmmu.endpoints.base import EndpointDmaError
from vsmmu.iommufd.sim import HostPersonality
from vsmmu.nesting import CBadStePolicy
from vsmmu.service import Service, ServiceConfig
from vsmmu.smmu import SmmuFeatures
from vsmmu.vfio_user import BarRegion, PciDevice, PciIdentity
from vsmmu.vfio_user.client import VfioUserClient
from vsmmu.vfio_user.uapi import PciRegion

RAM_GPA = 0x4000_0000
RAM_SIZE = 1 << 21
STRTAB = RAM_GPA
STRTAB_LOG2 = 6                  # linear, 64 STEs
CMDQ = RAM_GPA + 0x10000
CMDQ_LOG2 = 8
EVTQ = RAM_GPA + 0x20000
EVTQ_LOG2 = 5
EP_SID = 0x10
TEST_ENDPOINT_BAR_SIZE = 0x1000


class ProbeEndpoint:
    """A minimal endpoint for these tests: a 4 KiB BAR, and a DMA port it can be told to use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port: object | None = None
        self.resets = 0
        self.pci = PciDevice(PciIdentity(vendor_id=0x1B36, device_id=0x00FD,
                                         class_code=0xFF0000),
                             {0: BarRegion(TEST_ENDPOINT_BAR_SIZE, lambda o, s: 0,
                                           lambda o, d: None)})

    def bind_dma(self, port: object) -> None:
        self.port = port

    def reset(self) -> None:
        self.resets += 1


class Guest:
    """The test's guest: a memfd as RAM and a vfio-user client as the CPU's MMIO."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, RAM_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_SIZE)
        self.cmdq = QueueIndex(CMDQ_LOG2)
        self.evtq = QueueIndex(EVTQ_LOG2)
        self.prod = 0
        self.evtq_cons = 0

    def close(self) -> None:
        self.ram.close()
        os.close(self.fd)

    def poke(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - RAM_GPA:gpa - RAM_GPA + len(data)] = data

    def peek(self, gpa: int, size: int) -> bytes:
        return self.ram[gpa - RAM_GPA:gpa - RAM_GPA + size]

    async def write(self, reg: Reg, size: int, value: int) -> None:
        await self.client.region_write(PciRegion.BAR0, reg, value.to_bytes(size, "little"),
                                       posted=True)

    async def read(self, reg: Reg, size: int = 4) -> int:
        return int.from_bytes(await self.client.region_read(PciRegion.BAR0, reg, size), "little")

    async def enable(self) -> None:
        await self.write(Reg.STRTAB_BASE, 8, STRTAB)
        await self.write(Reg.STRTAB_BASE_CFG, 4, STRTAB_BASE_CFG.FMT.place(StrtabFmt.LINEAR)
                         | STRTAB_BASE_CFG.LOG2SIZE.place(STRTAB_LOG2))
        await self.write(Reg.CMDQ_BASE, 8, CMDQ | QUEUE_BASE.LOG2SIZE.place(CMDQ_LOG2))
        await self.write(Reg.EVENTQ_BASE, 8, EVTQ | QUEUE_BASE.LOG2SIZE.place(EVTQ_LOG2))
        await self.write(Reg.CR0, 4, CR0.CMDQEN.place(1) | CR0.EVENTQEN.place(1))
        await self.write(Reg.CR0, 4, CR0.CMDQEN.place(1) | CR0.EVENTQEN.place(1)
                         | CR0.SMMUEN.place(1))
        assert CR0.SMMUEN.test(await self.read(Reg.CR0ACK))

    async def issue(self, *commands: bytes) -> int:
        for command in (*commands, encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)):
            self.poke(CMDQ + self.cmdq.index(self.prod) * COMMAND_SIZE, command)
            self.prod = self.cmdq.increment(self.prod)
        await self.write(Reg.CMDQ_PROD, 4, self.prod)
        return await self.read(Reg.CMDQ_CONS)

    async def write_ste(self, sid: int, ste: Ste) -> int:
        self.poke(STRTAB + sid * STE_SIZE, ste.encode())
        return await self.issue(encode_command(CmdOpcode.CFGI_STE, sid=sid, leaf=1))

    async def events(self) -> list[tuple[EventId, int]]:
        prod = self.evtq.pointer(await self.read(Reg.EVENTQ_PROD))
        out = []
        while not self.evtq.is_empty(prod, self.evtq_cons):
            raw = self.peek(EVTQ + self.evtq.index(self.evtq_cons) * EVENT_SIZE, EVENT_SIZE)
            event = decode_event(raw)
            out.append((EventId(event.event_id), event.sid))
            self.evtq_cons = self.evtq.increment(self.evtq_cons)
        await self.write(Reg.EVENTQ_CONS, 4, self.evtq_cons)
        return out


Running = tuple[Service, Guest, QMPClient, ProbeEndpoint]


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **config: object) -> AsyncIterator[Running]:
    endpoint = ProbeEndpoint("probe0")
    service = Service(ServiceConfig(socket_dir=tmp_path, **config),  # type: ignore[arg-type]
                      endpoints=[(EP_SID, endpoint)])
    await service.start()
    client = VfioUserClient()
    qmp = QMPClient("test")
    guest: Guest | None = None
    try:
        await client.connect(str(service.smmu_socket))
        await client.negotiate()
        guest = Guest(client)
        await client.dma_map(RAM_GPA, RAM_SIZE, guest.fd)
        await qmp.connect(str(service.config.qmp_path))
        yield service, guest, qmp, endpoint
    finally:
        await qmp.disconnect()
        await client.close()
        if guest is not None:
            guest.close()
        await service.stop()


async def iommufd_rows(qmp: QMPClient, kind: str) -> list[dict[str, object]]:
    table = await qmp.execute("query-vsmmu-iommufd")
    assert isinstance(table, list)
    return [dict(row["detail"], id=row["id"]) for row in table if row["type"] == kind]


async def next_event(qmp: QMPClient, name: str) -> dict[str, object]:
    async def wait() -> dict[str, object]:
        async for event in qmp.events:
            if event["event"] == name:
                return dict(event["data"])
        raise AssertionError("event stream ended")
    return await asyncio.wait_for(wait(), 5)


async def test_register_access_dma_map_ste_and_cfgi_ste_give_a_nested_hwpt(
        tmp_path: Path) -> None:
    async with running(tmp_path) as (service, guest, qmp, _):
        assert (await iommufd_rows(qmp, "ioas"))[0]["mappings"] == 1
        idr0 = await guest.read(Reg.IDR0)
        assert idr0 == service.smmu.id_registers[Reg.IDR0]
        await guest.enable()
        assert len(await iommufd_rows(qmp, "viommu")) == 1
        (vdev,) = await iommufd_rows(qmp, "vdevice")
        assert vdev["virt_id"] == EP_SID
        with qmp.listener() as listener:
            cons = await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS,
                                                      s1_context_ptr=RAM_GPA + 0x30000))
            assert cons == guest.prod
            alloc = await asyncio.wait_for(listener.get(), 5)
        assert alloc["event"] == "VSMMU_HWPT_ALLOC" and alloc["data"]["errno"] is None
        hwpt_id = alloc["data"]["hwpt-id"]
        nested = {r["id"]: r for r in await iommufd_rows(qmp, "hwpt_nested")}
        assert int(str(nested[hwpt_id]["ste0"]), 16) & 0xFFFF_FFFF_FFC0 == RAM_GPA + 0x30000
        (device,) = await iommufd_rows(qmp, "device")
        assert device["hwpt"] == hwpt_id
        (stream,) = await qmp.execute("query-vsmmu-streams")  # type: ignore[misc]
        assert stream["sid"] == EP_SID and stream["hwpt-id"] == hwpt_id
        assert stream["status"] == "VALID" and stream["vdevice-id"] == vdev["id"]
        state = await qmp.execute("query-vsmmu")
        assert state["enabled"] is True and state["cmdq"]["error"] == "NONE"  # type: ignore[index]


async def test_inject_transaction_on_invalid_ste_raises_c_bad_ste_event(tmp_path: Path) -> None:
    async with running(tmp_path) as (_service, guest, qmp, endpoint):
        await guest.enable()
        await guest.write_ste(EP_SID, Ste(v=0))
        with qmp.listener() as listener:
            result = await qmp.execute("x-vsmmu-inject-transaction",
                                       {"sid": EP_SID, "iova": 0x1000})
            event = await asyncio.wait_for(listener.get(), 5)
        assert result["ok"] is False and result["event"] == "C_BAD_STE"  # type: ignore[index]
        assert event["event"] == "VSMMU_EVENT"
        assert event["data"]["type"] == "C_BAD_STE" and event["data"]["sid"] == EP_SID
        assert await guest.events() == [(EventId.C_BAD_STE, EP_SID)]
        # The endpoint's own DMA port sees the same refusal.
        port = endpoint.port
        with pytest.raises(EndpointDmaError):
            port.read(0x1000, 4)  # type: ignore[attr-defined]
        result = await qmp.execute("x-vsmmu-inject-transaction",
                                   {"sid": 0x3F0, "iova": 0, "write": True})
        assert result["event"] == "C_BAD_STREAMID"  # type: ignore[index]


async def test_bypass_stream_dma_reaches_the_memfd(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, guest, _qmp, endpoint):
        await guest.enable()
        await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.BYPASS))
        guest.poke(RAM_GPA + 0x5000, b"entropy")
        assert endpoint.port.read(RAM_GPA + 0x5000, 7) == b"entropy"  # type: ignore[attr-defined]


async def test_host_eio_emits_hwpt_alloc_error_and_c_bad_ste(tmp_path: Path) -> None:
    async with running(tmp_path, features=SmmuFeatures(ats=True),
                       host=HostPersonality(ats_in_nested=False)) as (_, guest, qmp, _e):
        await guest.enable()
        with qmp.listener() as listener:
            await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS,
                                              s1_context_ptr=RAM_GPA + 0x30000,
                                              eats=Eats.FULL))
            # The V=0 HWPT already exists (the STE was V=0 at enable): two events, not three.
            seen = [await asyncio.wait_for(listener.get(), 5) for _ in range(2)]
        names = [(e["event"], e["data"].get("errno"), e["data"].get("type")) for e in seen]
        assert ("VSMMU_HWPT_ALLOC", "EIO", None) in names
        assert ("VSMMU_EVENT", None, "C_BAD_STE") in names
        assert await guest.events() == [(EventId.C_BAD_STE, EP_SID)]


async def test_qemu_accel_policy_and_cerror_event(tmp_path: Path) -> None:
    async with running(tmp_path, features=SmmuFeatures(ats=True),
                       host=HostPersonality(ats_in_nested=False),
                       cbadste_policy=CBadStePolicy.QEMU_ACCEL) as (_, guest, qmp, _e):
        await guest.enable()
        start = guest.prod
        with qmp.listener() as listener:
            cons = await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS,
                                                     s1_context_ptr=RAM_GPA + 0x30000,
                                                     eats=Eats.FULL))
            events = [await asyncio.wait_for(listener.get(), 5) for _ in range(2)]
        cerror = next(e for e in events if e["event"] == "VSMMU_CERROR")
        assert cerror["data"]["error"] == "ILL" and cerror["data"]["index"] == start
        assert CMDQ_CONS.ERR.get(cons) == CError.ILL
        assert GERROR.CMDQ_ERR.test(await guest.read(Reg.GERROR))
        assert await guest.events() == []


async def test_write_ste_fault_injection_then_transaction(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, guest, qmp, _e):
        await guest.enable()
        await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.BYPASS))
        # Stage 2 on a vSMMU without S2P: the STE becomes ILLEGAL (the reserved Configs
        # 0b001-0b011 behave as abort since 8594cb9, so they no longer make one).
        corrupt = Ste(v=1, config=SteConfig.S2_TRANS).encode()
        result = await qmp.execute("x-vsmmu-write-ste", {
            "sid": EP_SID, "dwords": [int.from_bytes(corrupt[:8], "little")]})
        assert result["status"] == "ILLEGAL"  # type: ignore[index]
        result = await qmp.execute("x-vsmmu-inject-transaction", {"sid": EP_SID, "iova": 0})
        assert result["event"] == "C_BAD_STE"  # type: ignore[index]
        assert await guest.events() == [(EventId.C_BAD_STE, EP_SID)]


async def test_disconnect_tears_down_guest_state_and_reconnect_works(tmp_path: Path) -> None:
    async with running(tmp_path) as (service, guest, qmp, _e):
        await guest.enable()
        await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.BYPASS))
        assert await iommufd_rows(qmp, "viommu")
        await guest.client.close()
        await service.servers["smmu"].wait_disconnected()
        for _ in range(100):
            if not await iommufd_rows(qmp, "viommu"):
                break
            await asyncio.sleep(0.01)
        kinds = {row["type"] for row in await qmp.execute("query-vsmmu-iommufd")}  # type: ignore[union-attr]
        assert kinds <= {"ioas", "device", "hwpt_paging"}
        assert (await iommufd_rows(qmp, "ioas"))[0]["mappings"] == 0
        again = VfioUserClient()
        await again.connect(str(service.smmu_socket))
        await again.negotiate()
        assert int.from_bytes(await again.region_read(PciRegion.BAR0, Reg.CR0, 4),
                              "little") == 0
        await again.close()


async def test_device_reset_destroys_guest_objects(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, guest, qmp, _e):
        await guest.enable()
        assert await iommufd_rows(qmp, "vdevice")
        await guest.client.reset()
        assert not await iommufd_rows(qmp, "vdevice")
        assert not await iommufd_rows(qmp, "viommu")
        assert not await iommufd_rows(qmp, "veventq")
        state = await qmp.execute("query-vsmmu")
        assert state["enabled"] is False and state["guest-objects"] == []  # type: ignore[index]


# ---------------------------------------------------------------- sanitizer, fault injection

CD_A = RAM_GPA + 0x30000
CD_B = RAM_GPA + 0x30040
DIAG_TIMEOUT = 10.0


async def guest_error(qmp: QMPClient, kind: str) -> dict[str, object]:
    async def wait() -> dict[str, object]:
        async for event in qmp.events:
            if event["event"] == "VSMMU_GUEST_ERROR" and event["data"]["kind"] == kind:
                return dict(event["data"])
        raise AssertionError("event stream ended")
    return await asyncio.wait_for(wait(), DIAG_TIMEOUT)


async def counts(qmp: QMPClient) -> dict[str, int]:
    state = await qmp.execute("query-vsmmu")
    return {k: n for k, n in state["sanitizer"]["counts"].items() if n}  # type: ignore[index]


async def torn_update(guest: Guest) -> None:
    """A live S1 STE whose S1ContextPtr (dw0) and S1CIR (dw1) change between two CFGIs."""
    await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_A))
    await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_B,
                                      s1cir=1))


async def test_sanitize_flag_events_counts_and_the_qmp_toggle(tmp_path: Path) -> None:
    async with running(tmp_path, sanitize=True) as (_, guest, qmp, _e):
        await guest.enable()
        await torn_update(guest)
        error = await guest_error(qmp, "torn-ste")
        assert error["sid"] == EP_SID and error["index"] == guest.cmdq.index(guest.prod) - 2
        assert await counts(qmp) == {"torn-ste": 1}
        off = await qmp.execute("x-vsmmu-sanitize", {"enable": False})
        assert off["enabled"] is False  # type: ignore[index]
        await guest.write_ste(EP_SID, Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_A))
        assert await counts(qmp) == {"torn-ste": 1}, "nothing checked while off"


async def test_unsynced_invalidation_is_reported_once_the_queue_idles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vsmmu.diagnostics, "SYNC_IDLE_S", 0.05)
    async with running(tmp_path) as (_, guest, qmp, _e):
        assert (await qmp.execute("x-vsmmu-sanitize", {"enable": True}))["enabled"]  # type: ignore[index]
        await guest.enable()
        index = guest.cmdq.index(guest.prod)
        guest.poke(CMDQ + index * COMMAND_SIZE, encode_command(CmdOpcode.TLBI_NH_ALL))
        guest.prod = guest.cmdq.increment(guest.prod)
        await guest.write(Reg.CMDQ_PROD, 4, guest.prod)
        error = await guest_error(qmp, "missing-sync")
        assert error["index"] == index and "TLBI_NH_ALL" in str(error["message"])


async def test_fault_injection_commands_refuse_bad_arguments(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, guest, qmp, _e):
        with pytest.raises(ExecuteError, match="expected one of"):
            await qmp.execute("x-vsmmu-fail", {"op": "hwpt_free", "errno": "EIO"})
        with pytest.raises(ExecuteError, match="errno"):
            await qmp.execute("x-vsmmu-fail", {"op": "hwpt_alloc", "errno": "EWHATEVER"})
        with pytest.raises(ExecuteError, match="only hwpt_invalidate"):
            await qmp.execute("x-vsmmu-fail", {"op": "hwpt_alloc", "errno": "5", "entry": 1})
        with pytest.raises(ExecuteError, match="no vEVENTQ"):
            await qmp.execute("x-vsmmu-inject-vevent", {"sid": EP_SID, "event-id": 0x10})
        await guest.enable()
        with pytest.raises(ExecuteError, match="no endpoint device"):
            await qmp.execute("x-vsmmu-inject-vevent", {"sid": 0x7777, "event-id": 0x10})
        # hwpt_invalidate at entry 1 of a batch of two: CERROR_ILL at the second command.
        await qmp.execute("x-vsmmu-fail", {"op": "hwpt_invalidate", "errno": "EIO",
                                           "entry": 1})
        first = guest.cmdq.index(guest.prod)
        with qmp.listener() as listener:
            await guest.issue(encode_command(CmdOpcode.TLBI_NH_ALL),
                              encode_command(CmdOpcode.TLBI_NH_ALL))
            event = await asyncio.wait_for(listener.get(), DIAG_TIMEOUT)
        assert event["event"] == "VSMMU_CERROR" and event["data"]["index"] == first + 1, event
        state = await qmp.execute("query-vsmmu")
        assert state["fault-injection"] == {  # type: ignore[index]
            "armed": {}, "injected": {"hwpt_invalidate": 1}}
