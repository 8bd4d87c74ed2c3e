"""The seven ways a client, a guest or a local user took the service down (issue 13).

Each test drives a real ``vsmmu serve`` process (or, where no crash is at
stake, the service in-process) the way the attacker did, and asserts what
must happen instead.  Every wait is bounded: a service that hangs fails the
test within :data:`HANG_LIMIT_S`, it never hangs the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import resource
import stat
import time
from pathlib import Path

import pytest

from reliability.flood import BUFFER_BYTES, QUEUE_SIZE, rng_flood
from reliability.probes import ProcessMeter, sealable_memfd
from reliability.service import ServiceProcess
from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import COMMAND_SIZE, CError, SyncCs
from vsmmu.arch.registers import CMDQ_CONS, CR0, QUEUE_BASE, STRTAB_BASE_CFG, Reg, StrtabFmt
from vsmmu.arch.ste import STE_SIZE
from vsmmu.endpoints.base import EndpointDmaError
from vsmmu.qmp import QmpMonitor
from vsmmu.qmp.transport import MAX_CLIENTS
from vsmmu.service import Service, ServiceConfig
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import ClientError, VfioUserClient
from vsmmu.vfio_user.sample import ScratchDevice
from vsmmu.vfio_user.server import VfioUserServer

HANG_LIMIT_S = 30.0
RAM_GPA = 0x4000_0000
RAM_SIZE = 2 << 20
STRTAB = RAM_GPA
CMDQ = RAM_GPA + 0x10000
CMDQ_LOG2 = 4
SID = 0x10
BAR0 = uapi.PciRegion.BAR0


async def write_reg(client: VfioUserClient, reg: Reg, size: int, value: int) -> None:
    await client.region_write(BAR0, reg, value.to_bytes(size, "little"), posted=True)


async def read_reg(client: VfioUserClient, reg: Reg) -> int:
    data = await asyncio.wait_for(client.region_read(BAR0, reg, 4), HANG_LIMIT_S)
    return int.from_bytes(data, "little")


async def smmu_guest(socket: str, fd: int) -> VfioUserClient:
    """A guest on the SMMU function with ``fd`` as its RAM at RAM_GPA."""
    client = VfioUserClient()
    await client.connect(socket)
    await client.negotiate()
    await client.dma_map(RAM_GPA, RAM_SIZE, fd)
    return client


# -- 1. SIGBUS on a shrunk DMA_MAP memfd -------------------------------------------------


async def test_shrinking_the_dma_mapped_memfd_cannot_kill_the_service() -> None:
    """ftruncate(0) of guest RAM after DMA_MAP, then a command fetch and x-vsmmu-write-ste:
    the service refuses the shrink (the memfd is sealed) and keeps serving."""
    async with ServiceProcess() as service:
        fd = sealable_memfd(RAM_SIZE, "guest-ram")
        try:
            client = await smmu_guest(service.smmu_socket, fd)
            with contextlib.suppress(PermissionError):  # refused once the map is sealed
                os.ftruncate(fd, 0)
            assert os.fstat(fd).st_size == RAM_SIZE
            # Make the model read guest memory: a stream table and a command queue in it.
            await write_reg(client, Reg.STRTAB_BASE, 8, STRTAB)
            await write_reg(client, Reg.STRTAB_BASE_CFG, 4,
                            STRTAB_BASE_CFG.FMT.place(StrtabFmt.LINEAR)
                            | STRTAB_BASE_CFG.LOG2SIZE.place(6))
            await write_reg(client, Reg.CMDQ_BASE, 8, CMDQ | QUEUE_BASE.LOG2SIZE.place(CMDQ_LOG2))
            await write_reg(client, Reg.CR0, 4, CR0.CMDQEN.place(1) | CR0.SMMUEN.place(1))
            await write_reg(client, Reg.CMDQ_PROD, 4, 3)
            # The all-zero command was fetched (ILL, not a fetch abort): memory was read.
            assert CMDQ_CONS.ERR.get(await read_reg(client, Reg.CMDQ_CONS)) == CError.ILL
            await service.execute("x-vsmmu-write-ste", {"sid": SID, "dwords": [0] * 8})
            assert service.alive()
            await client.close()
        finally:
            os.close(fd)
        assert (await service.execute("query-vsmmu"))["enabled"] is False
        assert service.alive()


async def test_dma_map_of_an_fd_that_can_shrink_is_refused(tmp_path: Path) -> None:
    async with ServiceProcess() as service:
        fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # sealing not allowed
        os.ftruncate(fd, RAM_SIZE)
        client = VfioUserClient()
        try:
            await client.connect(service.smmu_socket)
            await client.negotiate()
            with pytest.raises(ClientError) as info:
                await client.dma_map(RAM_GPA, RAM_SIZE, fd)
            assert info.value.errno == errno.EINVAL
            too_small = sealable_memfd(uapi.DEFAULT_PGSIZE)
            with pytest.raises(ClientError):
                await client.dma_map(RAM_GPA, RAM_SIZE, too_small)
            os.close(too_small)
        finally:
            await client.close()
            os.close(fd)
        assert "cannot be sealed" in service.log_text()


# -- 2. A blocking interrupt fd ------------------------------------------------------------


async def test_a_full_blocking_pipe_as_interrupt_fd_never_blocks_the_service() -> None:
    async with ServiceProcess() as service:
        read, write = os.pipe()  # blocking, and nobody reads it
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
        capacity = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        client = VfioUserClient()
        try:
            await client.connect(service.smmu_socket)
            await client.negotiate()
            await client.set_irqs(uapi.PciIrq.INTX,
                                  uapi.IRQ_SET_DATA_EVENTFD | uapi.IRQ_SET_ACTION_TRIGGER,
                                  0, 1, fds=[write])
            os.close(write)
            write = -1
            unmask = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_UNMASK
            trigger = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_TRIGGER
            async with asyncio.timeout(HANG_LIMIT_S * 4):
                for _ in range(capacity // 8 + 32):  # INTx is automasked: unmask, trigger
                    await client.set_irqs(uapi.PciIrq.INTX, unmask, 0, 1)
                    await client.set_irqs(uapi.PciIrq.INTX, trigger, 0, 1)
            assert len(os.read(read, capacity + 4096)) == capacity  # it was filled, not more
            assert await read_reg(client, Reg.IDR0) != 0
            await asyncio.wait_for(service.execute("query-vsmmu"), HANG_LIMIT_S)
        finally:
            await client.close()
            os.close(read)
            if write >= 0:
                os.close(write)


# -- 3. A guest flooding virtio-rng ----------------------------------------------------------


FLOOD_SECONDS = 8.0


async def test_a_flooded_virtio_rng_does_not_starve_register_reads_or_qmp() -> None:
    """A queue kept full (64 chains of 64 KiB) and doorbells back to back.

    The bound is relative, so machine load cannot break it: a register read
    typically waits for a request's worth of device work or two, never for a
    whole queue's (:data:`QUEUE_SIZE` requests), which is what one doorbell
    cost when its work ran inside the register write.
    """
    async with ServiceProcess(endpoint="virtio-rng,sid=0x10,name=rng0") as service:
        result = await rng_flood(service.smmu_socket, service.endpoint_socket("rng0"),
                                 service.execute, FLOOD_SECONDS)
        print("\n".join(result.lines()))
        assert service.alive()
    assert result.requests_completed >= QUEUE_SIZE  # the device really worked
    per_request = result.seconds / result.requests_completed
    reads = result.register_reads
    # The median, not the tail: a loaded machine stalls a few reads whatever the service does.
    assert reads.percentile(0.5) < (QUEUE_SIZE // 8) * per_request, (
        f"median register read {reads.percentile(0.5) * 1000:.0f} ms while one "
        f"{BUFFER_BYTES // 1024} KiB request took {per_request * 1000:.1f} ms")
    assert reads.percentile(0.99) < 2.0  # the 50 ms target, asserted generously
    assert max(result.qmp.latencies_s) < 5.0  # the 1 s target, asserted generously


# -- 4. QMP sessions of clients that never read ----------------------------------------------


QMP_FLOODERS = 5
BIG_REPLY = "x" * 65536
"""A reply this size fills the socket at once, so the reply queue fills after ~1k commands."""
QMP_COMMANDS_EACH = 1500


async def test_qmp_clients_that_never_read_leave_no_session_behind(tmp_path: Path) -> None:
    """Clients send more commands than their reply queue holds, never read, and hang up
    once the monitor is stuck on them; their sessions (and queued replies) must go."""
    calls = 0

    def big(_args: object) -> str:
        nonlocal calls
        calls += 1
        return BIG_REPLY

    monitor = QmpMonitor(tmp_path / "qmp.sock")
    monitor.register("x-big", big, doc="A large reply.")
    await monitor.start()
    writers = []
    try:
        payload = b'{"execute":"qmp_capabilities"}' + b'{"execute":"x-big"}' * QMP_COMMANDS_EACH
        for _ in range(QMP_FLOODERS):
            _, writer = await asyncio.open_unix_connection(str(tmp_path / "qmp.sock"))
            writer.write(payload)
            writers.append(writer)
        deadline = time.monotonic() + HANG_LIMIT_S
        seen = -1
        while calls != seen:  # until every session is stuck on its full reply queue
            assert time.monotonic() < deadline
            seen = calls
            await asyncio.sleep(0.5)
        assert monitor.client_count == QMP_FLOODERS
        assert calls < QMP_FLOODERS * QMP_COMMANDS_EACH  # really stuck, not finished
        for writer in writers:
            writer.transport.abort()
        deadline = time.monotonic() + HANG_LIMIT_S
        while monitor.client_count:
            assert time.monotonic() < deadline, (
                f"{monitor.client_count} QMP sessions still alive {HANG_LIMIT_S} s after "
                "their clients left")
            await asyncio.sleep(0.1)
    finally:
        for writer in writers:
            writer.transport.abort()
        await monitor.close()


# -- 5. Addresses at or above 2^52 -----------------------------------------------------------


class _Probe:
    """A minimal endpoint whose DMA port the test uses directly."""

    def __init__(self) -> None:
        self.name = "probe0"
        self.port: object = None
        self.pci = ScratchDevice().pci

    def bind_dma(self, port: object) -> None:
        self.port = port

    def reset(self) -> None:
        pass


@pytest.mark.parametrize("iova", [1 << 52, 1 << 60, 1 << 63, (1 << 64) - 1])
async def test_addresses_beyond_52_bits_fault_architecturally(tmp_path: Path, iova: int) -> None:
    """An S1-bypass stream: the input address is the IPA, beyond any stage-2 input range,
    so a stage-2 translation fault whose record keeps IPA[51:12]; no internal error."""
    probe = _Probe()
    service = Service(ServiceConfig(socket_dir=tmp_path / "s"),
                      endpoints=[(SID, probe)])  # type: ignore[list-item]
    await service.start()
    fd = sealable_memfd(RAM_SIZE, "guest-ram")
    ram = mmap.mmap(fd, RAM_SIZE)
    try:
        client = await smmu_guest(str(service.smmu_socket), fd)
        await write_reg(client, Reg.STRTAB_BASE, 8, STRTAB)
        await write_reg(client, Reg.STRTAB_BASE_CFG, 4, STRTAB_BASE_CFG.FMT.place(
            StrtabFmt.LINEAR) | STRTAB_BASE_CFG.LOG2SIZE.place(6))
        await write_reg(client, Reg.CMDQ_BASE, 8, CMDQ | QUEUE_BASE.LOG2SIZE.place(CMDQ_LOG2))
        await write_reg(client, Reg.CR0, 4, CR0.CMDQEN.place(1) | CR0.SMMUEN.place(1))
        ram[SID * STE_SIZE:(SID + 1) * STE_SIZE] = Ste(v=1, config=SteConfig.BYPASS).encode()
        for n, command in enumerate((encode_command(CmdOpcode.CFGI_STE, sid=SID, leaf=1),
                                     encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV))):
            ram[0x10000 + n * COMMAND_SIZE:0x10000 + (n + 1) * COMMAND_SIZE] = command
        await write_reg(client, Reg.CMDQ_PROD, 4, 2)
        assert await read_reg(client, Reg.CMDQ_CONS) == 2
        result = service.commands.inject_transaction({"sid": SID, "iova": iova})
        assert result["ok"] is False and result["event"] == "F_TRANSLATION", result
        with pytest.raises(EndpointDmaError) as info:
            probe.port.write(iova, b"x" * 8)  # type: ignore[attr-defined]
        assert "F_TRANSLATION" in str(info.value)
        # The stream still works below 2^52 (the device is unaffected).
        ram[0x5000:0x5004] = b"rng!"
        assert probe.port.read(RAM_GPA + 0x5000, 4) == b"rng!"  # type: ignore[attr-defined]
        await client.close()
    finally:
        ram.close()
        os.close(fd)
        await service.stop()


# -- 6. Truncated SCM_RIGHTS, and a bound on QMP clients -------------------------------------


FD_LIMIT = 40


async def test_dma_map_whose_fd_was_truncated_fails_and_qmp_clients_are_bounded() -> None:
    """The service at its descriptor limit: the fd of a DMA_MAP is truncated by the kernel
    (MSG_CTRUNC); the request must fail, not succeed with no memory behind it."""
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    async with ServiceProcess(preexec=low_fd_limit) as service:
        assert service.meter is not None
        client = VfioUserClient()
        await client.connect(service.smmu_socket)
        await client.negotiate()
        idle: list[asyncio.StreamWriter] = []
        fd = sealable_memfd(RAM_SIZE, "guest-ram")
        try:
            deadline = time.monotonic() + HANG_LIMIT_S
            while service.meter.fds() < FD_LIMIT:  # idle QMP clients use up the descriptors
                assert time.monotonic() < deadline, f"service at {service.meter.fds()} fds"
                _, writer = await asyncio.open_unix_connection(service.qmp_socket)
                idle.append(writer)
                await asyncio.sleep(0.05)
            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(client.dma_map(RAM_GPA, RAM_SIZE, fd), HANG_LIMIT_S)
            assert info.value.errno == errno.EMFILE
            assert "MSG_CTRUNC" in service.log_text()
            for writer in idle:
                writer.transport.abort()
            idle.clear()
            deadline = time.monotonic() + HANG_LIMIT_S
            while True:  # descriptors free again: the same DMA_MAP now works
                try:
                    await asyncio.wait_for(client.dma_map(RAM_GPA, RAM_SIZE, fd), HANG_LIMIT_S)
                    break
                except ClientError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
        finally:
            for writer in idle:
                writer.transport.abort()
            await client.close()
            os.close(fd)


async def test_qmp_clients_past_the_limit_are_refused_clearly() -> None:
    async with ServiceProcess() as service:
        connections = []
        try:
            firsts = []
            for _ in range(40):
                reader, writer = await asyncio.open_unix_connection(service.qmp_socket)
                connections.append(writer)
                firsts.append(await asyncio.wait_for(reader.readline(), HANG_LIMIT_S))
            greetings = [line for line in firsts if b'"QMP"' in line]
            refusals = [line for line in firsts if b"too many QMP clients" in line]
            # The harness's own QMP client is one of the MAX_CLIENTS.
            assert len(greetings) == MAX_CLIENTS - 1, firsts
            assert len(refusals) == 40 - (MAX_CLIENTS - 1), firsts
        finally:
            for writer in connections:
                writer.transport.abort()
        await service.execute("query-vsmmu")


# -- 7. A second client on a vfio-user socket ------------------------------------------------


async def test_a_second_vfio_user_client_is_refused_at_once(tmp_path: Path) -> None:
    device = ScratchDevice()
    path = str(tmp_path / "dev.sock")
    async with VfioUserServer(device.pci, path) as server:
        first, second, third = VfioUserClient(), VfioUserClient(), VfioUserClient()
        try:
            await first.connect(path)
            await first.negotiate()
            await second.connect(path)
            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(second.negotiate(), HANG_LIMIT_S)
            assert info.value.errno == errno.EBUSY
            assert server.clients_refused == 1
            flags, _, _ = await first.device_info()  # the first client is unaffected
            assert flags & uapi.DEVICE_FLAGS_PCI
            await first.close()
            await asyncio.wait_for(server.wait_disconnected(), HANG_LIMIT_S)
            await third.connect(path)
            await asyncio.wait_for(third.negotiate(), HANG_LIMIT_S)  # served once A left
        finally:
            for client in (first, second, third):
                await client.close()


# -- socket modes ----------------------------------------------------------------------------


async def test_sockets_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        service = Service(ServiceConfig(socket_dir=tmp_path / "sockets"),
                          endpoints=[(SID, _Probe())])  # type: ignore[list-item]
        await service.start()
    finally:
        os.umask(previous)
    try:
        paths = [service.smmu_socket, service.config.qmp_path,
                 service.endpoint_socket("probe0")]
        modes = {str(p): stat.S_IMODE(os.stat(p).st_mode) for p in paths}
        assert set(modes.values()) == {0o600}, modes
        assert stat.S_IMODE(os.stat(tmp_path / "sockets").st_mode) == 0o700
    finally:
        await service.stop()


def test_process_meter_sees_this_process() -> None:
    meter = ProcessMeter(os.getpid())
    assert meter.alive() and meter.fds() > 2 and meter.rss_kib() > 0
