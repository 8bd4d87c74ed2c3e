"""asyncio transport for vfio-user: a connected unix stream socket, framing, fds.

:class:`MessageChannel` knows sockets, ``SCM_RIGHTS`` and framing, and
nothing of what a command means.  It reads through the raw socket with
``recvmsg`` (asyncio streams drop ancillary data), never asking for more bytes
than the current message still lacks, so descriptors always attach to the
message they were sent with.  Every descriptor it receives is handed on inside
a :class:`~vsmmu.vfio_user.messages.Message` or closed.

Both directions have a synchronous form for callers that run inside an event
loop callback (the server's reader): :meth:`MessageChannel.receive_nowait`
returns a message only when all its bytes have arrived, and
:meth:`MessageChannel.send_nowait` writes straight to the socket when nothing
is queued, queueing the rest for a writer callback.  The coroutines
:meth:`~MessageChannel.receive` and :meth:`~MessageChannel.send` are built on
them, so both forms frame and order bytes identically.
"""

from __future__ import annotations

import array
import asyncio
import collections
import dataclasses
import logging
import socket
from collections.abc import Sequence

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.messages import FrameDecoder, Message, VfioUserError, close_fds

logger = logging.getLogger(__name__)

#: Linux's SCM_MAX_FD: the most descriptors one sendmsg can carry.  Receiving
#: room for all of them means a peer that sends too many is answered with an
#: error reply for that message instead of silently losing some.
SCM_MAX_FD = 253
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
_HEADER_SIZE = uapi.HEADER_SIZE
_HEADER_UNPACK = uapi.HEADER.unpack
_CTRUNC = int(socket.MSG_CTRUNC)


class ConnectionClosed(VfioUserError):
    """The peer closed the connection (or it broke)."""


@dataclasses.dataclass
class _Outgoing:
    """Bytes not yet written; ``fds`` go with the first of them."""

    data: memoryview
    fds: Sequence[int]
    done: asyncio.Future[None] | None = None


class MessageChannel:
    """Sends and receives whole vfio-user messages on one connected socket.

    Only one caller may receive at a time (``receive`` or ``receive_nowait``);
    sends from any number of callers are written in the order they were made,
    each message's bytes contiguous on the wire.
    """

    def __init__(self, sock: socket.socket, max_message_size: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_message_size)
        self._outgoing: collections.deque[_Outgoing] = collections.deque()
        self._failure: ConnectionClosed | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._closed = False
        # Set when a recvmsg of the message being assembled lost fds (MSG_CTRUNC).
        self._fds_lost = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def fileno(self) -> int:
        """The socket's descriptor (for ``loop.add_reader``)."""
        return self._fd

    # ------------------------------------------------------------ receiving

    async def receive(self) -> Message:
        """Wait for the next complete message.

        :raises ConnectionClosed: the peer closed the socket (a partial
            message in flight is dropped and its fds closed).
        :raises ProtocolError: the header is impossible (bad size); the
            caller should drop the connection.
        """
        while True:
            message = self.receive_nowait()
            if message is not None:
                return message
            await self._wait_readable()

    def receive_nowait(self) -> Message | None:
        """The next complete message if all its bytes are here, else None (never blocks).

        A message that has only partly arrived stays in the decoder, with its
        fds, for the next call.

        A message whose descriptors the kernel truncated (``MSG_CTRUNC``: the
        process is out of fds, or the peer sent too many) comes with
        :attr:`~vsmmu.vfio_user.messages.Message.fds_lost` set, for the
        protocol layer to refuse.

        :raises ConnectionClosed: as :meth:`receive`.  :raises ProtocolError: as
            :meth:`receive`.
        """
        message = self._assemble()
        if message is not None and self._fds_lost:
            self._fds_lost = False
            message.fds_lost = True
        return message

    def _assemble(self) -> Message | None:
        decoder = self._decoder
        if not decoder.idle:
            return self._receive_rest()
        # Between messages: header, then body, each read asking for exactly what
        # the message lacks (the decoder's own chunking, without its copies).
        got = self._recv(_HEADER_SIZE)
        if got is None:
            return None
        header, fds = got
        if len(header) == _HEADER_SIZE:
            msg_id, command, size, flags, error = _HEADER_UNPACK(header)
            if size == _HEADER_SIZE:
                return Message(msg_id, command, flags, error, b"", fds)
            if _HEADER_SIZE < size <= decoder.max_message_size:
                body_size = size - _HEADER_SIZE
                got = self._recv(body_size)
                if got is not None and len(got[0]) == body_size:
                    body, more = got
                    if more:
                        fds.extend(more)
                    return Message(msg_id, command, flags, error, body, fds)
                decoder.feed(header, fds)  # a whole header of a good size: held
                return None if got is None else self._feed(*got) or self._receive_rest()
        return self._feed(header, fds) or self._receive_rest()

    def _receive_rest(self) -> Message | None:
        """Read the message in the decoder on, chunk by chunk, until it is whole or EAGAIN."""
        while True:
            got = self._recv(self._decoder.wanted())
            if got is None:
                return None
            message = self._feed(*got)
            if message is not None:
                return message

    def _feed(self, data: bytes, fds: list[int]) -> Message | None:
        if not data:
            close_fds(fds)
            partial = not self._decoder.idle
            self._decoder.reset()
            detail = " in the middle of a message" if partial else ""
            raise ConnectionClosed(f"vfio-user peer closed the connection{detail}")
        return self._decoder.feed(data, fds)

    def _recv(self, size: int) -> tuple[bytes, list[int]] | None:
        """One recvmsg of at most ``size`` bytes; None when nothing is there yet."""
        if self._closed:
            raise ConnectionClosed("vfio-user channel closed locally")
        try:
            data, ancdata, msg_flags, _ = self._sock.recvmsg(size, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise ConnectionClosed(f"vfio-user socket receive failed: {exc}") from exc
        if msg_flags & _CTRUNC:
            self._fds_lost = True
        return data, (_fds_from_ancillary(ancdata) if ancdata else [])

    async def _wait_readable(self) -> None:
        future: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        self._loop.add_reader(self._fd, ready)
        self._read_waiter = future
        try:
            await future
        finally:
            self._read_waiter = None
            if not self._closed:
                self._loop.remove_reader(self._fd)

    # ------------------------------------------------------------ sending

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message``; ``fds`` (borrowed, not closed) ride on its first byte.

        Returns once the socket took every byte.

        :raises ConnectionClosed: the socket is closed or broken.
        """
        await self.send_bytes(message.encode(), fds)

    async def send_bytes(self, raw: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``raw`` bytes as they are, ``fds`` on the first byte (tests use this
        to put malformed messages on the wire).

        :raises ConnectionClosed: the socket is closed or broken.
        """
        pending = self._enqueue(raw, fds, wait=True)
        if pending is not None:
            await pending

    def send_nowait(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message`` now when the socket takes it, else queue the rest for a
        writer callback (``fds`` must then stay open until :meth:`drain`).

        :raises ConnectionClosed: the socket is closed or broken.
        """
        self._enqueue(message.encode(), fds, wait=False)

    @property
    def send_queued(self) -> bool:
        """True while bytes wait for the socket to become writable."""
        return bool(self._outgoing)

    async def drain(self) -> None:
        """Wait until every queued byte is written.

        :raises ConnectionClosed: the socket is closed or broken.
        """
        if self._outgoing:
            done = self._enqueue(b"", (), wait=True)
            if done is not None:
                await done

    def _enqueue(self, raw: bytes, fds: Sequence[int], wait: bool) -> asyncio.Future[None] | None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise ConnectionClosed("vfio-user channel closed locally")
        data = memoryview(raw)
        if not self._outgoing:
            # Nothing ahead of us: write straight away; usually the socket takes it all.
            left = self._write(data, fds)
            if not left:
                return None
            if len(left) != len(data):
                fds = ()  # they went with the first byte
            data = left
        entry = _Outgoing(data, fds, self._loop.create_future() if wait else None)
        if not self._outgoing:
            self._loop.add_writer(self._fd, self._on_writable)
        self._outgoing.append(entry)
        return entry.done

    def _write(self, data: memoryview, fds: Sequence[int]) -> memoryview:
        """Write what the socket takes now; returns what is left.  Raises ConnectionClosed."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while data:
            try:
                sent = self._sock.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                return data
            except OSError as exc:
                self._fail(ConnectionClosed(f"vfio-user socket send failed: {exc}"))
                assert self._failure is not None
                raise self._failure from exc
            ancillary = []
            data = data[sent:]
        return data

    def _on_writable(self) -> None:
        outgoing = self._outgoing
        while outgoing:
            entry = outgoing[0]
            try:
                left = self._write(entry.data, entry.fds)
            except ConnectionClosed:
                return  # _fail settled every waiter
            if left:
                if len(left) != len(entry.data):
                    entry.fds = ()
                entry.data = left
                return
            outgoing.popleft()
            if entry.done is not None and not entry.done.done():
                entry.done.set_result(None)
        self._loop.remove_writer(self._fd)

    def _fail(self, failure: ConnectionClosed) -> None:
        """The socket broke: every queued send fails with ``failure`` from now on."""
        if self._failure is None:
            self._failure = failure
        self._drop_outgoing(self._failure)

    def _drop_outgoing(self, failure: ConnectionClosed) -> None:
        if self._outgoing and not self._closed:
            self._loop.remove_writer(self._fd)
        while self._outgoing:
            entry = self._outgoing.popleft()
            if entry.done is not None and not entry.done.done():
                entry.done.set_exception(failure)
                entry.done.exception()  # retrieved: a sender that left need not await it

    def close(self) -> None:
        """Close the socket and any fds of a partially received message.

        Queued sends fail with ConnectionClosed; a :meth:`receive` waiting for
        bytes wakes up and raises it.  Reader and writer callbacks on the socket
        are removed before it closes (its number may be reused at once).
        """
        if self._closed:
            return
        self._drop_outgoing(ConnectionClosed("vfio-user channel closed locally"))
        self._closed = True
        self._decoder.reset()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)
        self._sock.close()


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(received)
    return fds


__all__ = ["SCM_MAX_FD", "ConnectionClosed", "MessageChannel"]
