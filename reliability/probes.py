"""Hostile clients and a hostile guest, aimed at a running ``vsmmu serve``.

Each probe plays one kind of attacker for a given number of messages and
counts what happened in a :class:`ProbeStats`.  None of them assumes the
service survives: a reply that does not come within :data:`REPLY_TIMEOUT_S`
is a *hung* request, a socket that cannot be connected any more is a
*crash* (the caller checks the process too).

* :func:`vfio_user_wire_fuzz`: random and half-valid vfio-user messages, with
  pipes, eventfds and memfds attached (memfds that are shrunk after DMA_MAP,
  pipes given as interrupt eventfds and then triggered past their capacity),
  on a socket no VMM holds.
* :func:`qmp_wire_fuzz`: bytes, broken JSON, deep nesting, unknown and valid
  commands with hostile arguments, clients that never read their replies and
  hang up, more clients than the monitor takes; every round ends with a
  sentinel command whose reply must come back.
* :func:`hostile_register_fuzz`: a guest that owns the SMMU function and
  writes random values to its registers (biased towards the ones that make
  it read guest memory: queue bases, PROD, stream table, CR0), with random
  commands and STEs in its RAM, reading a register now and then (its
  latency is recorded).

:class:`ProcessMeter` reads a process's descriptor count and RSS from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import mmap
import os
import random
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from vsmmu.arch.registers import REG64, Reg
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import ClientError, VfioUserClient
from vsmmu.vfio_user.messages import Message
from vsmmu.vfio_user.transport import ConnectionClosed

#: A reply slower than this is counted as a hung request.
REPLY_TIMEOUT_S = 30.0
#: Messages per vfio-user connection before the fuzzer hangs up and reconnects.
MESSAGES_PER_CONNECTION = 200
PAGE = uapi.DEFAULT_PGSIZE
RAM_GPA = 0x4000_0000
RAM_SIZE = 2 << 20
SMMU_REGION = uapi.PciRegion.BAR0
SMMU_SPACE = 0x20000
#: Pipe capacity on Linux (64 KiB) in 8-byte eventfd increments, and then some.
PIPE_FILLING_TRIGGERS = 64 * 1024 // 8 + 64

_INTERESTING = (0, 1, 2, 3, 4, 7, 8, 16, 24, 32, 0x3F, 0xFFF, 0x1000, 0x7FFF_FFFF, 0xFFFF_FFFF,
                1 << 52, 1 << 60, (1 << 64) - 1)
_FLAGS = (0, 0, 0, 0x10, 0x10, 0x1, 0x20, 0x2, 0xF0)
_TYPE_MASK = int(uapi.MSG_TYPE_MASK)
_REPLY = int(uapi.MSG_TYPE_REPLY)
_NO_REPLY = int(uapi.MsgFlag.NO_REPLY)
_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1


@dataclasses.dataclass
class ProbeStats:
    """What one probe did and saw."""

    messages: int = 0
    replies: int = 0
    error_replies: int = 0
    connections: int = 0
    dropped_by_server: int = 0
    refused_connections: int = 0
    hung: int = 0
    latencies_s: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: ProbeStats) -> None:
        """Fold ``other`` into this one."""
        for field in dataclasses.fields(self):
            if field.name == "latencies_s":
                self.latencies_s.extend(other.latencies_s)
            else:
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def percentile(self, fraction: float) -> float:
        """The latency below which ``fraction`` of the timed requests fell (0 without any)."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class ProcessMeter:
    """Descriptor count and resident memory of a process (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fds(self) -> int:
        """Open descriptors."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        """Resident set size in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def alive(self) -> bool:
        """True while the process exists (and is not a zombie)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().split(") ", 1)[1][0]
        except (FileNotFoundError, IndexError):
            return False
        return state != "Z"


def sealable_memfd(size: int, name: str = "probe-ram") -> int:
    """A memfd of ``size`` bytes that the service may seal (as QEMU's are)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


# ---------------------------------------------------------------- vfio-user


def _field_value(rng: random.Random, code: str) -> int:
    value = rng.choice(_INTERESTING) if rng.random() < 0.6 else rng.getrandbits(64)
    limit = {"H": 0xFFFF, "I": _U32, "i": 0x7FFF_FFFF, "Q": _U64}.get(code, _U32)
    return value & limit


def _random_message(rng: random.Random, msg_id: int) -> tuple[int, int, bytes]:
    """``(command, flags, payload)`` of a message with a plausible layout."""
    command = rng.choice([*uapi.REQUEST_BODY, 0, 6, 13, 14, 99, 0xFFFF])
    flags = rng.choice(_FLAGS) if rng.random() < 0.9 else rng.getrandbits(32)
    layout = uapi.REQUEST_BODY.get(command)
    body = b""
    if layout is not None:
        body = layout.pack(*(_field_value(rng, code) for code in layout.format.lstrip("<")))
    if rng.random() < 0.5:
        body += rng.randbytes(rng.randrange(0, 64))
    del msg_id
    return command, flags, body


def _expects_reply(flags: int) -> bool:
    return flags & _TYPE_MASK != _REPLY and not flags & _NO_REPLY


def _random_fds(rng: random.Random) -> list[int]:
    fds: list[int] = []
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 5))):
        kind = rng.randrange(4)
        if kind == 0:
            read, write = os.pipe()
            os.close(write)
            fds.append(read)
        elif kind == 1:
            fds.append(sealable_memfd(4 * PAGE, "fuzz"))
        elif kind == 2:
            fds.append(os.eventfd(0))
        else:
            fds.append(os.memfd_create("fuzz-unsealable", os.MFD_CLOEXEC))
    return fds


async def _timed_request(client: VfioUserClient, stats: ProbeStats, command: int,
                         payload: bytes, fds: Sequence[int] = (),
                         flags: int = uapi.MSG_TYPE_REQUEST) -> bool:
    """One request; counts it.  Returns False when the connection is gone."""
    stats.messages += 1
    if not _expects_reply(flags):
        await client.send_raw(Message(0, command, flags, 0, payload).encode(), fds)
        return True
    start = time.monotonic()
    try:
        reply = await client.request(command, payload, fds, flags=flags,
                                     timeout=REPLY_TIMEOUT_S)
    except TimeoutError:
        stats.hung += 1
        return False
    stats.latencies_s.append(time.monotonic() - start)
    assert reply is not None
    stats.replies += 1
    if reply.flags & uapi.MsgFlag.ERROR:
        stats.error_replies += 1
    return True


async def _hostile_scenario(client: VfioUserClient, rng: random.Random,
                            stats: ProbeStats) -> bool:
    """One of the targeted attacks: shrunk memfd, blocking irq fd, unsealable memfd."""
    choice = rng.randrange(3)
    if choice == 0:  # DMA_MAP a memfd, shrink it, make the device touch it
        fd = sealable_memfd(RAM_SIZE)
        try:
            payload = uapi.DMA_MAP.pack(uapi.DMA_MAP.size, uapi.DMA_MAP_READ | uapi.DMA_MAP_WRITE,
                                        0, RAM_GPA, RAM_SIZE)
            if not await _timed_request(client, stats, uapi.Command.DMA_MAP, payload, [fd]):
                return False
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        for offset in (0, 0x98, 0x3000, 0x20):
            payload = uapi.REGION_RW.pack(offset, SMMU_REGION, 4) + (1).to_bytes(4, "little")
            if not await _timed_request(client, stats, uapi.Command.REGION_WRITE, payload):
                return False
        unmap = uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, uapi.DMA_UNMAP_ALL, 0, 0)
        return await _timed_request(client, stats, uapi.Command.DMA_UNMAP, unmap)
    if choice == 1:  # a pipe nobody reads as the INTx eventfd, triggered past its capacity
        read, write = os.pipe()
        try:
            flags = uapi.IRQ_SET_DATA_EVENTFD | uapi.IRQ_SET_ACTION_TRIGGER
            payload = uapi.IRQ_SET.pack(uapi.IRQ_SET.size, flags, uapi.PciIrq.INTX, 0, 1)
            if not await _timed_request(client, stats, uapi.Command.DEVICE_SET_IRQS, payload,
                                        [write]):
                return False
        finally:
            os.close(write)
        try:
            trigger = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_TRIGGER
            unmask = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_UNMASK
            for _ in range(rng.randrange(16, 64)):
                for action in (unmask, trigger):
                    payload = uapi.IRQ_SET.pack(uapi.IRQ_SET.size, action, uapi.PciIrq.INTX, 0, 1)
                    if not await _timed_request(client, stats, uapi.Command.DEVICE_SET_IRQS,
                                                payload):
                        return False
        finally:
            os.close(read)
        return True
    fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # can shrink any time: refused
    try:
        os.ftruncate(fd, 4 * PAGE)
        payload = uapi.DMA_MAP.pack(uapi.DMA_MAP.size, uapi.DMA_MAP_READ, 0, RAM_GPA, 4 * PAGE)
        return await _timed_request(client, stats, uapi.Command.DMA_MAP, payload, [fd])
    finally:
        os.close(fd)


async def vfio_user_wire_fuzz(path: str, messages: int, seed: int) -> ProbeStats:
    """Send about ``messages`` hostile vfio-user messages to the server at ``path``."""
    rng = random.Random(seed)
    stats = ProbeStats()
    while stats.messages < messages:
        client = VfioUserClient()
        try:
            await client.connect(path)
        except OSError:
            stats.refused_connections += 1
            await asyncio.sleep(0.05)
            continue
        stats.connections += 1
        try:
            if rng.random() < 0.9:
                await client.negotiate()
                stats.messages += 1
            await _fuzz_connection(client, rng, stats, messages)
        except (ConnectionClosed, ClientError):
            stats.dropped_by_server += 1
        finally:
            await client.close()
    return stats


async def _fuzz_connection(client: VfioUserClient, rng: random.Random, stats: ProbeStats,
                           budget: int) -> None:
    for _ in range(rng.randrange(1, MESSAGES_PER_CONNECTION)):
        if stats.messages >= budget:
            return
        roll = rng.random()
        if roll < 0.05:
            if not await _hostile_scenario(client, rng, stats):
                return
            continue
        if roll < 0.08:  # bytes that are no message at all; the stream is lost after them
            stats.messages += 1
            await client.send_raw(rng.randbytes(rng.randrange(1, 64)), ())
            return
        command, flags, payload = _random_message(rng, 0)
        fds = _random_fds(rng)
        try:
            alive = await _timed_request(client, stats, command, payload, fds, flags)
        finally:
            for fd in fds:
                os.close(fd)
        if not alive:
            return


# ---------------------------------------------------------------- QMP


_QMP_COMMANDS = ("query-vsmmu", "query-vsmmu-streams", "query-vsmmu-iommufd", "query-version",
                 "query-commands", "x-vsmmu-inject-transaction", "x-vsmmu-write-ste",
                 "qmp_capabilities", "quit", "no-such-command", "")


def _qmp_argument_value(rng: random.Random) -> object:
    return rng.choice([0, -1, 1 << 63, 1 << 64, 1 << 52, (1 << 64) - 1, 2 ** 200, 0.5, "x",
                       None, True, [], {}, [1] * rng.randrange(0, 8), "\u0000", 16, 0x10])


def _qmp_command(rng: random.Random, destructive: bool, ids: int) -> bytes:
    names = [n for n in _QMP_COMMANDS if destructive or n != "x-vsmmu-write-ste"]
    request: dict[str, object] = {"execute": rng.choice(names)}
    if rng.random() < 0.7:
        keys = ["sid", "iova", "ssid", "write", "dwords", "apply", "bogus"]
        request["arguments"] = {k: _qmp_argument_value(rng) for k in rng.sample(keys, 3)}
        if request["execute"] == "x-vsmmu-write-ste" and isinstance(request["arguments"], dict):
            request["arguments"]["dwords"] = [rng.getrandbits(64) for _ in range(8)]
    if rng.random() < 0.8:
        request["id"] = ids
    if rng.random() < 0.05:
        request["exec-oob"] = request.pop("execute")
    return json.dumps(request).encode()


def _qmp_garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 256))
    if kind == 1:
        return b"[" * rng.randrange(1, 2000)
    if kind == 2:
        return b'{"execute": "query-vsmmu", "arguments": {"x": "' + b"a" * 4096
    if kind == 3:
        return b"{}" * rng.randrange(1, 64)
    if kind == 4:
        return b'{"execute": 1}\n["list"]\n"string"\n123\nnull\n'
    return b'\xff\xfe{"execute":"query-version"}'


class _QmpConnection:
    """A raw QMP socket: bytes out, newline-free JSON replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = json.JSONDecoder()
        self.buffer = ""

    @classmethod
    async def open(cls, path: str) -> _QmpConnection:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
        return cls(reader, writer)

    async def next_object(self) -> dict[str, object] | None:
        """The next JSON object the server sent (None at end of stream)."""
        while True:
            text = self.buffer.lstrip()
            if text:
                try:
                    value, end = self.decoder.raw_decode(text)
                except ValueError:
                    pass
                else:
                    self.buffer = text[end:]
                    return value if isinstance(value, dict) else {}
            data = await self.reader.read(1 << 16)
            if not data:
                return None
            self.buffer += data.decode("utf-8", "replace")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


async def qmp_wire_fuzz(path: str, messages: int, seed: int, *,
                        destructive: bool = True) -> ProbeStats:
    """Send about ``messages`` hostile QMP inputs to the monitor at ``path``.

    ``destructive=False`` leaves ``x-vsmmu-write-ste`` out (a live guest is
    using the service).
    """
    rng = random.Random(seed)
    stats = ProbeStats()
    rounds = 0
    while stats.messages < messages:
        rounds += 1
        kind = rng.random()
        if kind < 0.05:
            await _qmp_unread_flood(path, rng, stats)
        elif kind < 0.08:
            await _qmp_too_many_clients(path, stats)
        else:
            await _qmp_round(path, rng, stats, destructive, rounds)
    return stats


async def _qmp_round(path: str, rng: random.Random, stats: ProbeStats, destructive: bool,
                     rounds: int) -> None:
    try:
        connection = await _QmpConnection.open(path)
    except OSError:
        stats.refused_connections += 1
        await asyncio.sleep(0.05)
        return
    stats.connections += 1
    try:
        greeting = await asyncio.wait_for(connection.next_object(), REPLY_TIMEOUT_S)
        if greeting is None or "QMP" not in greeting:
            stats.dropped_by_server += 1  # refused (too many clients) or closed
            return
        # One write per round: the monitor may hang up in the middle of it (input
        # too large), and writes after that would only be refused.
        inputs = [b'{"execute":"qmp_capabilities"}'] if rng.random() < 0.8 else []
        for number in range(rng.randrange(1, 40)):
            stats.messages += 1
            if rng.random() < 0.25:
                inputs.append(_qmp_garbage(rng))
            else:
                inputs.append(_qmp_command(rng, destructive, number))
        # A reset byte ends whatever the garbage left open; the sentinel must come back.
        sentinel = f"sentinel-{rounds}"
        inputs.append(b"\x00" + json.dumps({"execute": "query-version", "id": sentinel}).encode())
        stats.messages += 1
        connection.writer.write(b"".join(inputs))
        start = time.monotonic()
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                reply = await connection.next_object()
                if reply is None:
                    stats.dropped_by_server += 1  # an input too large or too deep
                    return
                if "error" in reply:
                    stats.error_replies += 1
                if "return" in reply or "error" in reply:
                    stats.replies += 1
                if reply.get("id") == sentinel:
                    stats.latencies_s.append(time.monotonic() - start)
                    return
    except TimeoutError:
        stats.hung += 1
    except (ConnectionError, OSError):
        stats.dropped_by_server += 1
    finally:
        await connection.close()


async def _qmp_unread_flood(path: str, rng: random.Random, stats: ProbeStats) -> None:
    """Thousands of commands, never a reply read, then a hang-up (the session must go)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except OSError:
        stats.refused_connections += 1
        sock.close()
        return
    stats.connections += 1
    payload = b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-vsmmu"}' * rng.randrange(
        500, 2500)
    try:
        sent = 0
        async with asyncio.timeout(5.0):
            while sent < len(payload):
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(payload[sent:])
                    continue
                await asyncio.sleep(0.001)
    except (TimeoutError, OSError):
        pass  # the monitor stopped reading: that is its flow control
    stats.messages += payload.count(b"execute")
    sock.close()


async def _qmp_too_many_clients(path: str, stats: ProbeStats, count: int = 48) -> None:
    """Open more idle clients than the monitor takes; the extra ones must be refused."""
    connections: list[_QmpConnection] = []
    try:
        for _ in range(count):
            try:
                connections.append(await _QmpConnection.open(path))
            except OSError:
                stats.refused_connections += 1
        for connection in connections:
            stats.connections += 1
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                first = await asyncio.wait_for(connection.next_object(), REPLY_TIMEOUT_S)
                if first is not None and "error" in first:
                    stats.refused_connections += 1
    finally:
        for connection in connections:
            await connection.close()


# ---------------------------------------------------------------- hostile guest


_HOT_REGISTERS = (Reg.CR0, Reg.CR1, Reg.CR2, Reg.GBPA, Reg.IRQ_CTRL, Reg.GERRORN,
                  Reg.STRTAB_BASE, Reg.STRTAB_BASE_CFG, Reg.CMDQ_BASE, Reg.CMDQ_PROD,
                  Reg.CMDQ_CONS, Reg.EVENTQ_BASE, Reg.EVENTQ_PROD, Reg.EVENTQ_CONS,
                  Reg.GERROR_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG0)


def _register_write(rng: random.Random) -> tuple[int, bytes]:
    if rng.random() < 0.8:
        reg = rng.choice(_HOT_REGISTERS)
        width = 8 if reg in REG64 else 4
        if rng.random() < 0.5 and reg in (Reg.STRTAB_BASE, Reg.CMDQ_BASE, Reg.EVENTQ_BASE):
            value = RAM_GPA + rng.randrange(0, RAM_SIZE, 64) | rng.randrange(0, 20)
        else:
            value = rng.choice(_INTERESTING) if rng.random() < 0.5 else rng.getrandbits(64)
        return int(reg), (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    width = rng.choice((1, 2, 4, 8))
    offset = rng.randrange(0, SMMU_SPACE - width)
    return offset, rng.randbytes(width)


async def hostile_register_fuzz(smmu_socket: str, writes: int, seed: int,
                                read_every: int = 64) -> ProbeStats:
    """Be a guest that owns the SMMU function and writes ``writes`` random register values.

    Its RAM (a sealed memfd at :data:`RAM_GPA`) is filled with random bytes, so
    every queue and table the model reads holds garbage; a register read every
    ``read_every`` writes is timed.  Raises OSError when the socket is busy.
    """
    rng = random.Random(seed)
    stats = ProbeStats()
    fd = sealable_memfd(RAM_SIZE, "hostile-guest-ram")
    ram = mmap.mmap(fd, RAM_SIZE)
    try:
        ram[:] = rng.randbytes(RAM_SIZE)
        client = VfioUserClient()
        await client.connect(smmu_socket)
        stats.connections += 1
        try:
            await client.negotiate()
            await client.dma_map(RAM_GPA, RAM_SIZE, fd)
            stats.messages += 2
            while stats.messages < writes:
                offset, data = _register_write(rng)
                await client.region_write(SMMU_REGION, offset, data, posted=True)
                stats.messages += 1
                if stats.messages % read_every == 0:
                    if rng.random() < 0.1:
                        start = rng.randrange(0, RAM_SIZE - PAGE)
                        ram[start:start + PAGE] = rng.randbytes(PAGE)
                    payload = uapi.REGION_RW.pack(rng.choice((int(Reg.CR0ACK), int(Reg.GERROR),
                                                             int(Reg.CMDQ_CONS))), SMMU_REGION, 4)
                    if not await _timed_request(client, stats, uapi.Command.REGION_READ,
                                                payload):
                        break
        except (ConnectionClosed, ClientError):
            stats.dropped_by_server += 1
        finally:
            await client.close()
    finally:
        ram.close()
        os.close(fd)
    return stats


def fd_flags_nonblocking(fd: int) -> bool:
    """True when ``fd`` has O_NONBLOCK (tests check what the service did to a client fd)."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


__all__ = [
    "REPLY_TIMEOUT_S",
    "ProbeStats",
    "ProcessMeter",
    "fd_flags_nonblocking",
    "hostile_register_fuzz",
    "qmp_wire_fuzz",
    "sealable_memfd",
    "vfio_user_wire_fuzz",
]
