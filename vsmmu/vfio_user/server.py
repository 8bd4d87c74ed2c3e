"""The vfio-user server: one listening unix socket per PCI function.

:class:`VfioUserServer` serves one client at a time on its socket path (a
second client gets an EBUSY reply to its first request and is hung up on) and
runs a connection: the event loop's reader callback on the socket (no task
or future per message) receives the messages in order, hands each request
to the :class:`~vsmmu.vfio_user.session.Session` and queues its reply before
reading the next (so posted writes take effect in order), and routes replies
to the server's own DMA_READ/DMA_WRITE requests.  When the
client goes away (or breaks the framing) the device is detached — eventfds
closed, DMA maps unmapped, config space reset — and the next client may
connect.  Several servers share one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.device import PciFunction
from vsmmu.vfio_user.dma import DmaError
from vsmmu.vfio_user.messages import Message, ProtocolError, VfioUserError, error_reply_to
from vsmmu.vfio_user.session import Session
from vsmmu.vfio_user.transport import ConnectionClosed, MessageChannel

logger = logging.getLogger(__name__)

_MSG_ID_MODULO = 1 << 16
#: Socket files: read/write for the owner only (and the umask that yields it at bind).
OWNER_ONLY_MODE = 0o600
OWNER_ONLY_UMASK = 0o177
#: How long a refused second client has to send its first request.
REFUSAL_TIMEOUT_S = 5.0
#: The largest first request read from a refused client (a VERSION is far smaller).
REFUSAL_MAX_MESSAGE = 1 << 16
#: Messages handled per reader wakeup before other callbacks get their turn
#: (a client flooding posted writes must not starve the loop).
_MESSAGES_PER_WAKEUP = 64
_TYPE_MASK = int(uapi.MSG_TYPE_MASK)
_REPLY = int(uapi.MSG_TYPE_REPLY)


def bind_owner_only(sock: socket.socket, path: str) -> None:
    """Bind a unix socket at ``path`` with mode 0600, whatever the process umask.

    The umask is narrowed around ``bind`` (which creates the file) so the file
    is never reachable by others, not even for a moment.
    """
    previous = os.umask(OWNER_ONLY_UMASK)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    os.chmod(path, OWNER_ONLY_MODE)


class ServerError(VfioUserError):
    """The server cannot do what was asked (not started, not connected, ...)."""


class Connection:
    """One connected client: request dispatch, server-initiated DMA.

    Requests are read and answered inside the event loop's reader callback on
    the socket (no task or future per message): each one is handled and its
    reply written before the next is read, so posted writes take effect in
    order.  When the client does not take our replies fast enough, reading
    pauses until they are written.
    """

    def __init__(self, device: PciFunction, sock: socket.socket) -> None:
        self.device = device
        self.session = Session(device)
        self.channel = MessageChannel(sock, self.session.max_message_size)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._loop = asyncio.get_running_loop()
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._resume: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve until the client disconnects or breaks the protocol; never raises
        (but passes cancellation on, after tearing the connection down)."""
        self._loop.add_reader(self.channel.fileno, self._on_readable)
        try:
            await self._finished
        finally:
            if self._resume is not None:
                self._resume.cancel()
            self.channel.close()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionClosed("vfio-user client disconnected"))
            self._pending.clear()

    def _on_readable(self) -> None:
        channel = self.channel
        handle = self.session.handle
        try:
            for _ in range(_MESSAGES_PER_WAKEUP):
                message = channel.receive_nowait()
                if message is None:
                    return
                if message.flags & _TYPE_MASK == _REPLY:
                    self._complete(message)
                    continue
                reply = handle(message)
                if reply is not None:
                    # A reply's fds are lent by the function (a region to mmap), never ours.
                    channel.send_nowait(reply, reply.fds)
                    if channel.send_queued:
                        self._pause_reading()
                        return
        except ConnectionClosed as exc:
            logger.info("vfio-user client gone: %s", exc)
            self._finish()
        except ProtocolError as exc:
            logger.warning("vfio-user protocol error, dropping the client: %s", exc)
            self._finish()
        except Exception:
            logger.exception("vfio-user connection failed, dropping the client")
            self._finish()

    def _pause_reading(self) -> None:
        """Stop reading until our queued replies are written (the client reads slowly)."""
        self._loop.remove_reader(self.channel.fileno)
        self._resume = self._loop.create_task(self._resume_reading())

    async def _resume_reading(self) -> None:
        try:
            await self.channel.drain()
        except ConnectionClosed as exc:
            logger.info("vfio-user client gone: %s", exc)
            self._finish()
            return
        if not self._finished.done():
            self._loop.add_reader(self.channel.fileno, self._on_readable)

    def _finish(self) -> None:
        if not self.channel.closed:
            self._loop.remove_reader(self.channel.fileno)
        if not self._finished.done():
            self._finished.set_result(None)

    def _complete(self, reply: Message) -> None:
        future = self._pending.pop(reply.msg_id, None)
        if future is None or future.done():
            logger.warning(
                "vfio-user: unexpected reply id=%d (%s)", reply.msg_id, reply.command_name
            )
            reply.close()
            return
        future.set_result(reply)

    async def _request(self, command: uapi.Command, payload: bytes) -> Message:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) % _MSG_ID_MODULO
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self.channel.send(Message(msg_id, command, uapi.MSG_TYPE_REQUEST, 0, payload))
            reply = await future
        finally:
            self._pending.pop(msg_id, None)
        reply.close()
        if reply.flags & uapi.MsgFlag.ERROR:
            raise DmaError(f"{command.name}: client replied errno {reply.error}")
        return reply

    async def dma_read(self, gpa: int, size: int) -> bytes:
        """Read guest memory through DMA_READ messages (for maps without an fd).

        :raises DmaError: the client refused.  :raises ConnectionClosed: it left.
        """
        chunks: list[bytes] = []
        step = self.session.client_max_xfer
        for offset in range(0, size, step):
            count = min(step, size - offset)
            request = uapi.DMA_RW.pack(gpa + offset, count)
            reply = await self._request(uapi.Command.DMA_READ, request)
            data = reply.payload[uapi.DMA_RW.size : uapi.DMA_RW.size + count]
            if len(data) != count:
                raise DmaError(f"DMA_READ gpa={gpa + offset:#x}: {len(data)} of {count} bytes")
            chunks.append(data)
        return b"".join(chunks)

    async def dma_write(self, gpa: int, data: bytes) -> None:
        """Write guest memory through DMA_WRITE messages (for maps without an fd).

        :raises DmaError: the client refused.  :raises ConnectionClosed: it left.
        """
        step = self.session.client_max_xfer
        for offset in range(0, len(data), step):
            chunk = data[offset : offset + step]
            request = uapi.DMA_RW.pack(gpa + offset, len(chunk)) + chunk
            await self._request(uapi.Command.DMA_WRITE, request)


class VfioUserServer:
    """Serves one :class:`PciFunction` on a unix socket path, one client at a time."""

    def __init__(self, device: PciFunction, path: str | os.PathLike[str]) -> None:
        self.device = device
        self.path = os.fspath(path)
        self.connection: Connection | None = None
        self.connections_served = 0
        #: Clients turned away because another one was connected.
        self.clients_refused = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._refusals: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()

    async def start(self) -> None:
        """Bind and listen on :attr:`path` (a stale socket file is replaced).

        The socket file is created with mode 0600 whatever the umask: whoever
        can connect can read and write guest memory.

        :raises OSError: the path cannot be bound.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_owner_only(listener, self.path)
            listener.listen(1)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._task = asyncio.create_task(self._serve(), name=f"vfio-user {self.path}")
        logger.info("vfio-user server listening on %s", self.path)

    async def _serve(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            if self.connection is not None:
                # One device, one client: a second one is told so at once instead
                # of waiting in the backlog until the first leaves.
                refusal = asyncio.create_task(self._refuse(sock))
                self._refusals.add(refusal)
                refusal.add_done_callback(self._refusals.discard)
                continue
            try:
                self.device.attach_client()
            except Exception:
                logger.exception("vfio-user %s: the function cannot serve a client; closed",
                                 self.path)
                sock.close()
                continue
            connection = Connection(self.device, sock)
            self.connection = connection
            self._disconnected.clear()
            self._connected.set()
            logger.info("vfio-user client connected on %s", self.path)
            self._session = asyncio.create_task(self._run(connection),
                                                name=f"vfio-user client {self.path}")

    async def _run(self, connection: Connection) -> None:
        try:
            await connection.run()
        finally:
            self.connection = None
            self._connected.clear()
            self._detach()
            self.connections_served += 1
            self._disconnected.set()

    async def _refuse(self, sock: socket.socket) -> None:
        """Answer a second client's first request with EBUSY, then hang up."""
        self.clients_refused += 1
        channel = MessageChannel(sock, REFUSAL_MAX_MESSAGE)
        try:
            async with asyncio.timeout(REFUSAL_TIMEOUT_S):
                request = await channel.receive()
                request.close()
                logger.warning("vfio-user %s: refused a second client (%s): a client is "
                               "already connected and the device serves one", self.path,
                               request.command_name)
                if not request.is_reply and not request.no_reply:
                    await channel.send(error_reply_to(request, errno.EBUSY))
        except (TimeoutError, VfioUserError) as exc:
            logger.warning("vfio-user %s: second client dropped: %s", self.path,
                           exc or "it sent no request in time")
        finally:
            channel.close()

    def _detach(self) -> None:
        try:
            self.device.detach_client()
        except Exception:
            logger.exception("vfio-user device teardown failed on %s", self.path)

    async def wait_connected(self) -> Connection:
        """Wait until a client is connected and return its connection."""
        while self.connection is None:
            await self._connected.wait()
        return self.connection

    async def wait_disconnected(self) -> None:
        """Wait until the current client (if any) has gone and been torn down."""
        if self.connection is not None:
            await self._disconnected.wait()

    async def dma_read(self, gpa: int, size: int) -> bytes:
        """Guest memory by mmap when the map has an fd, else by DMA_READ messages.

        :raises DmaError: unmapped, or refused by the client.
        :raises ServerError: no client connected.
        """
        mapping = self.device.dma.find(gpa, size)
        if mapping.memory is not None:
            return self.device.dma.read(gpa, size)
        return await self._connection().dma_read(gpa, size)

    async def dma_write(self, gpa: int, data: bytes) -> None:
        """Like :meth:`dma_read`, for writes."""
        mapping = self.device.dma.find(gpa, len(data))
        if mapping.memory is not None:
            self.device.dma.write(gpa, data)
            return
        await self._connection().dma_write(gpa, data)

    def _connection(self) -> Connection:
        if self.connection is None:
            raise ServerError(f"vfio-user {self.path}: no client connected")
        return self.connection

    async def close(self) -> None:
        """Stop listening, drop the client (tearing the device down), remove the socket."""
        for task in [self._task, self._session, *self._refusals]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._session = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        logger.info("vfio-user server on %s closed", self.path)

    async def __aenter__(self) -> VfioUserServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


__all__ = ["Connection", "ServerError", "VfioUserServer", "bind_owner_only"]
