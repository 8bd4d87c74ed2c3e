"""asyncio transport for vfio-user: a connected unix stream socket, framing, fds.

:class:`MessageChannel` knows sockets, ``SCM_RIGHTS`` and framing, and
nothing of what a command means.  It reads through the raw socket with
``recvmsg`` (asyncio streams drop ancillary data), never asking for more bytes
than the current message still lacks, so descriptors always attach to the
message they were sent with.  Every descriptor it receives is handed on inside
a :class:`~vsmmu.vfio_user.messages.Message` or closed.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections.abc import Sequence

from vsmmu.vfio_user.messages import FrameDecoder, Message, VfioUserError, close_fds

logger = logging.getLogger(__name__)

#: Linux's SCM_MAX_FD: the most descriptors one sendmsg can carry.  Receiving
#: room for all of them means a peer that sends too many is answered with an
#: error reply for that message instead of silently losing some.
SCM_MAX_FD = 253
_FD_SIZE = array.array("i").itemsize


class ConnectionClosed(VfioUserError):
    """The peer closed the connection (or it broke)."""


class MessageChannel:
    """Sends and receives whole vfio-user messages on one connected socket.

    ``receive`` must only be awaited by one task at a time; ``send`` may be
    called from several tasks (sends are serialised).
    """

    def __init__(self, sock: socket.socket, max_message_size: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_message_size)
        self._send_lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    async def receive(self) -> Message:
        """Wait for the next complete message.

        :raises ConnectionClosed: the peer closed the socket (a partial
            message in flight is dropped and its fds closed).
        :raises ProtocolError: the header is impossible (bad size); the
            caller should drop the connection.
        """
        while True:
            data, fds = await self._recv_chunk(self._decoder.wanted())
            if not data:
                close_fds(fds)
                partial = not self._decoder.idle
                self._decoder.reset()
                detail = " in the middle of a message" if partial else ""
                raise ConnectionClosed(f"vfio-user peer closed the connection{detail}")
            message = self._decoder.feed(data, fds)
            if message is not None:
                return message

    async def _recv_chunk(self, size: int) -> tuple[bytes, list[int]]:
        ancillary_size = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
        while True:
            if self._closed:
                raise ConnectionClosed("vfio-user channel closed locally")
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(size, ancillary_size)
            except (BlockingIOError, InterruptedError):
                await self._wait_io(readable=True)
                continue
            except OSError as exc:
                raise ConnectionClosed(f"vfio-user socket receive failed: {exc}") from exc
            fds = _fds_from_ancillary(ancdata)
            if msg_flags & socket.MSG_CTRUNC:
                logger.warning("vfio-user: ancillary data truncated; some fds were lost")
            return data, fds

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message``; ``fds`` (borrowed, not closed) ride on its first byte.

        :raises ConnectionClosed: the socket is closed or broken.
        """
        await self.send_bytes(message.encode(), fds)

    async def send_bytes(self, raw: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``raw`` bytes as they are, ``fds`` on the first byte (tests use this
        to put malformed messages on the wire).

        :raises ConnectionClosed: the socket is closed or broken.
        """
        data = memoryview(raw)
        async with self._send_lock:
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            while data:
                if self._closed:
                    raise ConnectionClosed("vfio-user channel closed locally")
                try:
                    sent = self._sock.sendmsg([data], ancillary)
                except (BlockingIOError, InterruptedError):
                    await self._wait_io(readable=False)
                    continue
                except OSError as exc:
                    raise ConnectionClosed(f"vfio-user socket send failed: {exc}") from exc
                ancillary = []
                data = data[sent:]

    async def _wait_io(self, readable: bool) -> None:
        future: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        fd = self._sock.fileno()
        if readable:
            self._loop.add_reader(fd, ready)
        else:
            self._loop.add_writer(fd, ready)
        try:
            await future
        finally:
            if readable:
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        """Close the socket and any fds of a partially received message."""
        if self._closed:
            return
        self._closed = True
        self._decoder.reset()
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
