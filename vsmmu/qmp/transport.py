"""Transport of the QMP monitor: a unix-socket listener and JSON-framed channels.

This layer knows sockets, framing and flow control, and nothing of QMP: it
hands the protocol layer one :class:`QmpChannel` per client and runs the
protocol's per-client coroutine in a task it owns.

Framing: QMP has no message delimiter.  ``qemu.qmp`` writes one JSON object
after another with no newline, ``qmp-shell`` and people typing write lines.
So, like QEMU's JSON streamer, :class:`JsonFramer` splits the byte stream at
the end of each top-level JSON value by counting brackets outside strings,
without parsing; parsing is the protocol layer's job.  An ASCII control
character (other than tab, CR, LF) or a byte that is never valid UTF-8 ends
the current message at once: that is how the QMP spec tells a client to
resynchronise a confused server.  A message longer than ``max_message`` or
nested deeper than ``MAX_NESTING`` cannot be resynchronised and ends the
connection.

Flow control, designed so that no client can stall the service:

* Every channel has a bounded outbound queue drained by its own writer task.
* :meth:`QmpChannel.send` (command replies) waits for room: a client that does
  not read its replies only stops its own command stream.
* :meth:`QmpChannel.offer` (events) never waits: when the queue is full the
  message is dropped and ``False`` returned; the caller counts and logs drops.

Disconnect and cancellation:

* Peer hang-up: the reader sees EOF, the protocol coroutine returns, the
  replies already queued are flushed (bounded by ``CLOSE_TIMEOUT_S``) and the
  socket is closed.  A write that fails (the peer closed without reading)
  marks the peer gone: queued and later output is discarded, a sender
  waiting for room is released, and the next read reports end of stream, so
  the session ends at once whatever it had queued.
* At most ``max_clients`` clients at a time; one more gets the listener's
  ``refusal`` message and is disconnected.
* :meth:`QmpListener.close`: the protocol coroutines are cancelled (an
  in-flight command handler sees ``CancelledError``), unsent output is
  discarded, sockets are aborted and the socket file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from vsmmu.qmp.errors import QmpFramingError, QmpTransportError

LOG = logging.getLogger(__name__)

#: Longest message a client may send.
MAX_MESSAGE_BYTES: Final = 1 << 20
#: Deepest bracket nesting accepted in a message (QEMU's JSON streamer limit).
MAX_NESTING: Final = 1024
#: Bytes asked of the socket per read.
READ_CHUNK_BYTES: Final = 64 * 1024
#: Messages that may wait in one client's outbound queue.
OUTBOUND_QUEUE_DEPTH: Final = 1024
#: How long a closing channel may spend flushing replies to a slow peer.
CLOSE_TIMEOUT_S: Final = 1.0
#: Clients served at once; one more is sent the refusal and hung up on (each
#: client holds a descriptor, and descriptors are what DMA_MAP needs).
MAX_CLIENTS: Final = 32
#: The socket file's mode (whoever connects can write guest memory), and the
#: umask that gives it at bind time.
SOCKET_MODE: Final = 0o600
_SOCKET_UMASK: Final = 0o177


# Bytes that end the current message at once: ASCII controls except TAB, LF,
# CR, and 0xFE/0xFF, which never occur in UTF-8.
_RESET_BYTES: Final = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
_STRING_STOP: Final = re.compile(rb'["\\' + _RESET_BYTES + rb"]")
_VALUE_STOP: Final = re.compile(rb'[{}\[\]"' + _RESET_BYTES + rb"]")
_RESET_SET: Final = frozenset(
    b for b in range(256) if re.fullmatch(rb"[" + _RESET_BYTES + rb"]", bytes([b]))
)
_WHITESPACE: Final = frozenset(b" \t\r\n")
_OPENERS: Final = frozenset(b"{[")
_CLOSERS: Final = frozenset(b"}]")
_QUOTE: Final = ord('"')
_BACKSLASH: Final = ord("\\")


class JsonFramer:
    """Split a byte stream into top-level JSON values without parsing them.

    Feed bytes with :meth:`feed`, take complete messages with :meth:`pop`.
    A message is the bytes of one top-level value, or of malformed input up
    to the point where the framer gave up on it (the parser will reject it).
    """

    def __init__(
        self, max_message: int = MAX_MESSAGE_BYTES, max_nesting: int = MAX_NESTING
    ) -> None:
        self._max_message = max_message
        self._max_nesting = max_nesting
        self._buf = bytearray()
        self._scan = 0  # where scanning resumes in _buf
        self._depth = 0
        self._in_string = False
        self._messages: deque[bytes] = deque()

    def pop(self) -> bytes | None:
        """Return the oldest complete message, or None if there is none yet."""
        return self._messages.popleft() if self._messages else None

    def finish(self) -> bytes | None:
        """At end of stream: return the unfinished message, if it is not blank."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scan = self._depth = 0
        self._in_string = False
        return rest or None

    def feed(self, data: bytes) -> None:
        """Append ``data`` and split off every message it completes.

        :raise QmpFramingError: the unfinished message exceeds the size or
            nesting limit; the framer is unusable afterwards.
        """
        buf = self._buf
        buf += data
        start, i = 0, self._scan
        while i < len(buf):
            if self._in_string:
                m = _STRING_STOP.search(buf, i)
                if m is None:
                    i = len(buf)
                    break
                i = m.start()
                byte = buf[i]
                if byte == _BACKSLASH:
                    i += 2  # may step past the end: the escaped byte is still to come
                    continue
                if byte == _QUOTE:
                    self._in_string = False
                    i += 1
                    if self._depth == 0:
                        start = self._emit(start, i)
                    continue
                start = i = self._reset(start, i)
            elif self._depth > 0:
                m = _VALUE_STOP.search(buf, i)
                if m is None:
                    i = len(buf)
                    break
                i = m.start()
                byte = buf[i]
                i += 1
                if byte in _OPENERS:
                    self._depth += 1
                    if self._depth > self._max_nesting:
                        raise QmpFramingError(
                            f"JSON nesting depth exceeds the limit of {self._max_nesting}"
                        )
                elif byte in _CLOSERS:
                    self._depth -= 1
                    if self._depth == 0:
                        start = self._emit(start, i)
                elif byte == _QUOTE:
                    self._in_string = True
                else:
                    start = i = self._reset(start, i - 1)
            else:
                start, i = self._step_top_level(start, i)
        del buf[:start]
        self._scan = i - start
        if len(buf) > self._max_message:
            self._too_large()

    def _step_top_level(self, start: int, i: int) -> tuple[int, int]:
        """Advance over one byte between values or inside a bare top-level token."""
        byte = self._buf[i]
        in_token = start < i
        if byte in _WHITESPACE:
            if in_token:
                start = self._emit(start, i)
            return start + 1, i + 1
        if byte in _RESET_SET:
            start = self._reset(start, i)
            return start, start
        if byte in _OPENERS or byte == _QUOTE or byte in _CLOSERS:
            if in_token:
                start = self._emit(start, i)
            if byte in _CLOSERS:
                return self._emit(start, i + 1), i + 1
            if byte == _QUOTE:
                self._in_string = True
            else:
                self._depth = 1
        return start, i + 1

    def _emit(self, start: int, end: int) -> int:
        if end - start > self._max_message:
            self._too_large()
        self._messages.append(bytes(self._buf[start:end]))
        return end

    def _too_large(self) -> None:
        raise QmpFramingError(f"QMP input message exceeds the limit of {self._max_message} bytes")

    def _reset(self, start: int, at: int) -> int:
        """End the current message at the reset byte ``at``, kept so it fails to parse."""
        self._depth = 0
        self._in_string = False
        return self._emit(start, at + 1)


class QmpChannel:
    """One client connection: framed messages in, queued messages out.

    Created by :class:`QmpListener`; the protocol layer reads with
    :meth:`read_message` and writes with :meth:`send` or :meth:`offer`.
    """

    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message: int,
        queue_depth: int,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._framer = JsonFramer(max_message)
        self._eof = False
        # None is the end-of-output marker queued by a graceful close.
        self._outbound: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queue_depth)
        self._writer_task: asyncio.Task[None] | None = None
        self._peer_gone = False

    def __repr__(self) -> str:
        return f"QmpChannel({self.name!r})"

    @property
    def is_open(self) -> bool:
        """True while messages queued now may still reach the peer."""
        return not self._peer_gone and not self._writer.is_closing()

    def start(self) -> None:
        """Start the writer task; called once by the listener."""
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"{self.name}-writer")

    async def read_message(self) -> bytes | None:
        """Return the bytes of the next message, or None at end of stream.

        A connection reset counts as end of stream.  Unfinished input at end
        of stream is returned as a last message.

        :raise QmpFramingError: the input exceeds the size or nesting limit;
            the stream cannot be resynchronised and must be closed.
        """
        if self._peer_gone:
            return None  # nobody can read the reply: stop executing its commands
        while (message := self._framer.pop()) is None:
            if self._eof or self._peer_gone:
                return None
            try:
                data = await self._reader.read(READ_CHUNK_BYTES)
            except OSError as exc:
                LOG.info("%s: read failed (%s); treating as hang-up", self.name, exc)
                data = b""
            if not data:
                self._eof = True
                return self._framer.finish()
            self._framer.feed(data)
        return message

    async def send(self, data: bytes) -> None:
        """Queue ``data`` for the peer, waiting while the queue is full.

        Returns at once, dropping ``data``, if the peer is gone.
        """
        if not self.is_open:
            return
        await self._outbound.put(data)

    def offer(self, data: bytes) -> bool:
        """Queue ``data`` without waiting; return False if it was dropped (queue full)."""
        if not self.is_open:
            return False
        try:
            self._outbound.put_nowait(data)
        except asyncio.QueueFull:
            return False
        return True

    async def _write_loop(self) -> None:
        # Keeps consuming after a failed write, discarding, so a sender waiting
        # for room in the queue is never left waiting for a writer that left.
        while (data := await self._outbound.get()) is not None:
            if self._peer_gone:
                continue
            try:
                self._writer.write(data)
                await self._writer.drain()
            except OSError as exc:
                LOG.info("%s: write failed (%s); peer is gone", self.name, exc)
                self._peer_gone = True

    async def aclose(self, *, flush: bool) -> None:
        """Close the connection; with ``flush``, first deliver queued output.

        Flushing is bounded by ``CLOSE_TIMEOUT_S``; whatever is left after it
        is discarded.  Never raises except ``CancelledError``.
        """
        task = self._writer_task
        try:
            if task is not None and flush and not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._outbound.put(None)
                        await asyncio.shield(task)
        finally:
            # Runs even when the flush is cancelled, so the socket is always
            # released.  abort() does not wait for a peer that never reads,
            # as close() would.
            self._peer_gone = True
            self._writer.transport.abort()
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])


ConnectionHandler = Callable[[QmpChannel], Awaitable[None]]


class QmpListener:
    """A unix-socket server that runs ``handler(channel)`` for every client.

    :param path: the socket file to create.
    :param handler: the protocol layer's per-client coroutine; when it
        returns, the channel is flushed and closed.
    :param max_clients: clients served at once.
    :param refusal: bytes sent to a client past ``max_clients`` before it is
        disconnected (the protocol layer's error message).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: ConnectionHandler,
        *,
        max_message: int = MAX_MESSAGE_BYTES,
        queue_depth: int = OUTBOUND_QUEUE_DEPTH,
        max_clients: int = MAX_CLIENTS,
        refusal: bytes = b"",
    ) -> None:
        self.path = os.fspath(path)
        self.max_clients = max_clients
        #: Clients turned away because ``max_clients`` were connected.
        self.clients_refused = 0
        self._refusal = refusal
        self._handler = handler
        self._max_message = max_message
        self._queue_depth = queue_depth
        self._server: asyncio.Server | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)

    async def start(self) -> None:
        """Create the socket file and start accepting clients.

        A stale socket file left by a dead process is replaced.

        :raise QmpTransportError: the listener is already started, the path
            holds something that is not a socket, or another process is
            serving on it.
        :raise OSError: the socket cannot be created.
        """
        if self._server is not None:
            raise QmpTransportError(f"QMP listener on {self.path!r} is already started")
        await self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            previous = os.umask(_SOCKET_UMASK)
            try:
                sock.bind(self.path)
            finally:
                os.umask(previous)
            os.chmod(self.path, SOCKET_MODE)
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise
        st = os.stat(self.path)
        self._socket_inode = (st.st_dev, st.st_ino)
        LOG.info("QMP monitor listening on %s", self.path)

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise QmpTransportError(
                f"QMP socket path {self.path!r} exists and is not a socket; "
                "expected a free path or a stale socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.setblocking(False)
            await asyncio.get_running_loop().sock_connect(probe, self.path)
        except OSError:
            LOG.info("removing stale QMP socket %s", self.path)
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise QmpTransportError(
            f"QMP socket {self.path!r} is served by another process; expected a free path"
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            # Accepted just before close(): close() cannot see this task, so
            # refuse the client here instead of serving it on a closed monitor.
            writer.transport.abort()
            return
        if len(self._connections) >= self.max_clients:
            self.clients_refused += 1
            LOG.warning("QMP client refused: %d clients already connected (the limit)",
                        len(self._connections))
            writer.write(self._refusal)
            writer.close()  # sends what is buffered, then closes; nothing waits on the peer
            return
        task = asyncio.current_task()
        assert task is not None  # asyncio runs client callbacks in a task
        self._connections.add(task)
        channel = QmpChannel(
            f"qmp-client-{next(self._serial)}",
            reader,
            writer,
            max_message=self._max_message,
            queue_depth=self._queue_depth,
        )
        LOG.info("%s: connected", channel.name)
        channel.start()
        try:
            await self._run_connection(channel)
        except asyncio.CancelledError:
            # Only close() cancels these tasks, and it is waiting for them;
            # ending quietly keeps asyncio's client-callback wrapper from
            # reporting the cancellation as an error.
            pass
        finally:
            self._connections.discard(task)
            LOG.info("%s: disconnected", channel.name)

    async def _run_connection(self, channel: QmpChannel) -> None:
        flush = False
        try:
            await self._handler(channel)
            flush = True
        except Exception:
            # The protocol layer handles its own errors; reaching here is a bug,
            # and it must cost one client, never the listener.
            LOG.exception("%s: connection handler failed", channel.name)
        finally:
            await channel.aclose(flush=flush)

    async def close(self) -> None:
        """Stop accepting, disconnect every client and remove the socket file.

        In-flight handlers are cancelled.  Idempotent.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._unlink_own_socket()

    def _unlink_own_socket(self) -> None:
        inode, self._socket_inode = self._socket_inode, None
        if inode is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        # Only remove the file we created, not one a successor put there.
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(self.path)
