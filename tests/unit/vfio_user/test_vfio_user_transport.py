"""The channel's synchronous receive and send paths frame and attach fds exactly
as the reference reader does, and the server pauses reading under back-pressure.

Reference: a :class:`FrameDecoder` fed by one ``recvmsg`` of exactly
``decoder.wanted()`` bytes at a time (the rule that ties every fd to the
message whose bytes arrived with it).  The same writes — random pieces of a
stream of messages, fds on random pieces, reads interleaved with writes so that
messages arrive in parts — go to two socket pairs, one read by the reference
and one by :meth:`MessageChannel.receive_nowait`; the messages, the errors and
the fds (compared by inode) must be the same.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import VfioUserClient
from vsmmu.vfio_user.messages import FrameDecoder, Message, ProtocolError, close_fds
from vsmmu.vfio_user.sample import ScratchDevice
from vsmmu.vfio_user.server import VfioUserServer
from vsmmu.vfio_user.transport import SCM_MAX_FD, ConnectionClosed, MessageChannel

MAX_MESSAGE = 256
FD_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
SMALL_SOCKET_BUFFER = 4096
FLOOD_READS = 2000
REGISTER_BYTES = 4

Outcome = tuple[str, int, int, int, int, bytes, list[int]]


def message_bytes(msg_id: int, command: int, flags: int, body: bytes,
                  size: int | None = None) -> bytes:
    total = uapi.HEADER_SIZE + len(body) if size is None else size
    return uapi.HEADER.pack(msg_id, command, total, flags, 0) + body


good_message = st.builds(
    message_bytes, st.integers(0, 0xFFFF), st.integers(0, 20), st.integers(0, 0x3F),
    st.binary(max_size=40))
bad_size = st.builds(
    message_bytes, st.integers(0, 0xFFFF), st.integers(0, 20), st.just(0),
    st.binary(max_size=8),
    st.sampled_from([0, 1, uapi.HEADER_SIZE - 1, MAX_MESSAGE + 1, 0xFFFFFFFF]))


@st.composite
def write_plan(draw: st.DrawFn) -> list[tuple[bytes, int, bool]]:
    """Pieces to write: (bytes, fds riding on the piece, read between pieces?)."""
    messages = draw(st.lists(good_message, max_size=6))
    if draw(st.booleans()):
        messages.append(draw(bad_size))
    stream = b"".join(messages)
    pieces: list[tuple[bytes, int, bool]] = []
    position = 0
    while position < len(stream):
        length = draw(st.integers(1, max(1, len(stream) - position)))
        pieces.append((stream[position : position + length], draw(st.integers(0, 2)),
                       draw(st.booleans())))
        position += length
    return pieces


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def outcome(message: Message) -> Outcome:
    inodes = [inode(fd) for fd in message.fds]
    message.close()
    return ("message", message.msg_id, message.command, message.flags, message.error,
            message.payload, inodes)


class ReferenceReader:
    """The exact-chunk reader the fast path must agree with."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(MAX_MESSAGE)

    def drain(self) -> list[Outcome]:
        results: list[Outcome] = []
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(self.decoder.wanted(), FD_SPACE)
            except BlockingIOError:
                return results
            fds = [fd for level, kind, payload in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", payload)]
            if not data:
                close_fds(fds)
                self.decoder.reset()
                return [*results, ("closed", 0, 0, 0, 0, b"", [])]
            try:
                message = self.decoder.feed(data, fds)
            except ProtocolError:
                return [*results, ("protocol", 0, 0, 0, 0, b"", [])]
            if message is not None:
                results.append(outcome(message))


def channel_drain(channel: MessageChannel) -> list[Outcome]:
    results: list[Outcome] = []
    while True:
        try:
            message = channel.receive_nowait()
        except ConnectionClosed:
            return [*results, ("closed", 0, 0, 0, 0, b"", [])]
        except ProtocolError:
            return [*results, ("protocol", 0, 0, 0, 0, b"", [])]
        if message is None:
            return results
        results.append(outcome(message))


def send_piece(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


async def compare(plan: list[tuple[bytes, int, bool]], open_fds: Callable[[], int]) -> None:
    before = open_fds()
    ref_ours, ref_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fast_ours, fast_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ref_ours.setblocking(False)
    reference = ReferenceReader(ref_ours)
    channel = MessageChannel(fast_ours, MAX_MESSAGE)
    expected: list[Outcome] = []
    got: list[Outcome] = []
    for data, fd_count, read_now in plan:
        fds = [os.eventfd(0) for _ in range(fd_count)]
        send_piece(ref_theirs, data, fds)
        send_piece(fast_theirs, data, fds)
        close_fds(fds)
        if read_now:
            expected += reference.drain()
            got += channel_drain(channel)
    for peer in (ref_theirs, fast_theirs):
        peer.close()
    expected += reference.drain()
    got += channel_drain(channel)
    reference.decoder.reset()
    ref_ours.close()
    channel.close()
    assert got == expected
    assert open_fds() == before


# open_fds is a stateless counting function: sharing it between examples is fine.
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plan=write_plan())
def test_receive_nowait_equals_exact_chunk_reader(
    plan: list[tuple[bytes, int, bool]], open_fds: Callable[[], int]
) -> None:
    asyncio.run(compare(plan, open_fds))


async def test_fds_of_a_message_sent_after_an_fd_free_one_stay_with_it(
    open_fds: Callable[[], int],
) -> None:
    # Two messages queued before the reader looks: the second carries the fd.
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = MessageChannel(ours, MAX_MESSAGE)
    fd = os.eventfd(0)
    send_piece(theirs, message_bytes(1, 2, 0, b"first"), [])
    send_piece(theirs, message_bytes(2, 3, 0, b"second"), [fd])
    first = channel.receive_nowait()
    second = channel.receive_nowait()
    assert first is not None and second is not None
    assert (first.msg_id, first.fds) == (1, [])
    assert second.msg_id == 2 and [inode(f) for f in second.fds] == [inode(fd)]
    second.close()
    os.close(fd)
    theirs.close()
    channel.close()
    assert open_fds() == before


async def test_queued_sends_keep_order_and_fail_on_close() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
    channel = MessageChannel(ours, MAX_MESSAGE)
    sent = [Message(n, 1, 0, 0, bytes([n % 251]) * 200) for n in range(200)]
    for message in sent:
        channel.send_nowait(message)
    assert channel.send_queued  # the peer reads nothing yet: the socket filled up
    theirs.setblocking(False)
    received = bytearray()
    while channel.send_queued or len(received) < sum(len(m.encode()) for m in sent):
        await asyncio.sleep(0)
        with contextlib.suppress(BlockingIOError):
            received += theirs.recv(1 << 16)
    assert bytes(received) == b"".join(m.encode() for m in sent)
    channel.send_nowait(Message(0, 1, 0, 0, bytes(1 << 16)))  # bigger than the buffer
    waiter = asyncio.ensure_future(channel.drain())
    await asyncio.sleep(0)
    channel.close()
    try:
        await waiter
    except ConnectionClosed:
        pass
    else:
        raise AssertionError("drain after close: expected ConnectionClosed")
    theirs.close()


class QueueWatchingDevice(ScratchDevice):
    """The sample device whose BAR reads note whether replies were waiting to be sent."""

    def __init__(self) -> None:
        super().__init__()
        self.server: VfioUserServer | None = None
        self.replies_queued_at_read: list[bool] = []

    def read(self, offset: int, size: int) -> int:
        connection = self.server.connection if self.server is not None else None
        self.replies_queued_at_read.append(connection is not None
                                           and connection.channel.send_queued)
        return super().read(offset, size)


async def test_server_pauses_reading_while_the_client_does_not_take_replies(
    socket_path: str,
) -> None:
    """A client that sends without reading: no request is handled while replies wait to
    be sent (the server stopped reading), and every reply still arrives, in order."""
    sample = QueueWatchingDevice()
    seen_queued: list[bool] = []

    async def watch(server: VfioUserServer) -> None:
        while True:  # between reader callbacks: did replies ever pile up?
            if server.connection is not None and server.connection.channel.send_queued:
                seen_queued.append(True)
            await asyncio.sleep(0)

    async with VfioUserServer(sample.pci, socket_path) as server, VfioUserClient() as client:
        sample.server = server
        watcher = asyncio.ensure_future(watch(server))
        await client.connect(socket_path)
        await client.negotiate()
        await client.region_write(uapi.PciRegion.BAR0, 0, b"\x11\x22\x33\x44")
        raw = client.channel._sock  # the test floods without reading
        connection = await server.wait_connected()
        connection.channel._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                            SMALL_SOCKET_BUFFER)
        request = message_bytes(0, uapi.Command.REGION_READ, 0,
                                uapi.REGION_RW.pack(0, uapi.PciRegion.BAR0, REGISTER_BYTES))
        reader_task = client._reader
        assert reader_task is not None
        reader_task.cancel()
        raw.setblocking(True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, raw.sendall, request * FLOOD_READS)
        expected = (message_bytes(0, uapi.Command.REGION_READ, uapi.MSG_TYPE_REPLY,
                                  request[uapi.HEADER_SIZE:] + b"\x11\x22\x33\x44"))
        wanted = len(expected) * FLOOD_READS

        def read_all() -> bytes:
            data = bytearray()
            while len(data) < wanted:
                chunk = raw.recv(1 << 16)
                assert chunk, "server closed the connection"
                data += chunk
            return bytes(data)

        replies = await loop.run_in_executor(None, read_all)
        assert replies == expected * FLOOD_READS
        assert server.connection is not None
        assert server.connection.session.stats["REGION_READ"] == FLOOD_READS
        watcher.cancel()
        assert seen_queued, "the replies never filled the socket: nothing tested"
        reads = sample.replies_queued_at_read
        assert len(reads) == FLOOD_READS and not any(reads), \
            f"{sum(reads)} requests handled while replies were queued"
