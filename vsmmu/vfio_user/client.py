"""A small vfio-user client in pure Python, for tests and tools.

It speaks the same wire format as QEMU 11.1's client (including its
DMA_READ/DMA_WRITE layout when answering the server) and can also send
arbitrary raw bytes and fds, so tests can drive every command and every
error path.  Replies are matched by message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.messages import Message, VfioUserError, close_fds
from vsmmu.vfio_user.transport import ConnectionClosed, MessageChannel

logger = logging.getLogger(__name__)

_MSG_ID_MODULO = 1 << 16


class ClientError(VfioUserError):
    """The server answered a request with an error reply."""

    def __init__(self, command: int, errno_value: int) -> None:
        super().__init__(f"vfio-user command {command} failed with errno {errno_value}")
        self.command = command
        self.errno = errno_value


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """A DEVICE_GET_REGION_INFO reply.

    ``argsz`` is what the server says the whole reply needs (more than was
    asked for when capabilities did not fit); ``caps`` the capability chain
    that came (offsets from the reply's ``argsz``); ``fd`` a descriptor to
    mmap the region from at ``offset`` (the caller owns and closes it).
    """

    flags: int
    index: int
    size: int
    offset: int = 0
    argsz: int = 0
    cap_offset: int = 0
    caps: bytes = b""
    fd: int | None = None


@dataclasses.dataclass(frozen=True)
class IrqInfo:
    """A DEVICE_GET_IRQ_INFO reply."""

    flags: int
    index: int
    count: int


#: Serves the server's DMA requests: ``read(gpa, size) -> bytes`` / ``write(gpa, data)``.
DmaReadHandler = Callable[[int, int], bytes]
DmaWriteHandler = Callable[[int, bytes], None]


class VfioUserClient:
    """Connects to a vfio-user server socket and issues commands."""

    def __init__(
        self,
        dma_read: DmaReadHandler | None = None,
        dma_write: DmaWriteHandler | None = None,
    ) -> None:
        self._channel: MessageChannel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._dma_read = dma_read
        self._dma_write = dma_write
        self.server_capabilities: dict[str, object] = {}

    async def connect(self, path: str) -> None:
        """Connect to the server socket at ``path``.

        :raises OSError: nothing listens there.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except OSError:
            sock.close()
            raise
        self._channel = MessageChannel(sock, uapi.DEFAULT_MAX_XFER + uapi.MAX_FIXED_PART)
        self._reader = asyncio.create_task(self._read_loop(), name="vfio-user client reader")

    async def close(self) -> None:
        """Disconnect (idempotent)."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def __aenter__(self) -> VfioUserClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def channel(self) -> MessageChannel:
        """The connected channel.

        :raises ConnectionClosed: not connected.
        """
        if self._channel is None:
            raise ConnectionClosed("vfio-user client is not connected")
        return self._channel

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.channel.receive()
                if message.is_reply:
                    future = self._pending.pop(message.msg_id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
                    else:
                        message.close()
                else:
                    await self._serve_request(message)
        except (ConnectionClosed, VfioUserError) as exc:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionClosed(str(exc)))
            self._pending.clear()

    async def _serve_request(self, message: Message) -> None:
        """Answer DMA_READ/DMA_WRITE the way QEMU 11.1 does."""
        message.close()
        try:
            if len(message.payload) < uapi.DMA_RW.size:
                raise ValueError(f"{len(message.payload)}-byte payload, expected >= 16")
            gpa, count = uapi.DMA_RW.unpack_from(message.payload)
            if message.command == uapi.Command.DMA_READ and self._dma_read is not None:
                data = self._dma_read(gpa, count)
                payload = uapi.DMA_RW.pack(gpa, count) + data
            elif message.command == uapi.Command.DMA_WRITE and self._dma_write is not None:
                if count > len(message.payload) - uapi.DMA_RW.size:
                    raise ValueError(f"DMA_WRITE count {count} exceeds the data")
                self._dma_write(gpa, message.payload[uapi.DMA_RW.size :][:count])
                payload = b""
            else:
                raise ValueError(f"no handler for {message.command_name}")
            reply = Message(message.msg_id, message.command, uapi.MSG_TYPE_REPLY, 0, payload)
        except Exception as exc:
            logger.warning("vfio-user client: refusing %s: %s", message.command_name, exc)
            flags = uapi.MSG_TYPE_REPLY | uapi.MsgFlag.ERROR
            reply = Message(message.msg_id, message.command, flags, errno.EINVAL)
        await self.channel.send(reply)

    # -- raw access --------------------------------------------------------

    def _allocate_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) % _MSG_ID_MODULO
        return msg_id

    async def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        flags: int = uapi.MSG_TYPE_REQUEST,
        timeout: float = 5.0,
    ) -> Message | None:
        """Send one request; wait for its reply unless ``flags`` has NO_REPLY.

        Does not raise on an error reply: the caller inspects ``flags``/``error``.
        :raises ConnectionClosed: the server went away.
        :raises TimeoutError: no reply within ``timeout`` seconds.
        """
        msg_id = self._allocate_id()
        message = Message(msg_id, command, flags, 0, payload)
        if flags & uapi.MsgFlag.NO_REPLY:
            await self.channel.send(message, fds)
            return None
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self.channel.send(message, fds)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put bytes on the wire as they are (for malformed-message tests)."""
        await self.channel.send_bytes(data, fds)

    async def call(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request and return the reply payload.

        :raises ClientError: the server replied with an error.
        """
        reply = await self.request(command, payload, fds)
        assert reply is not None
        if reply.flags & uapi.MsgFlag.ERROR:
            raise ClientError(command, reply.error)
        return reply.payload

    # -- commands ----------------------------------------------------------

    async def negotiate(self, capabilities: dict[str, object] | None = None) -> None:
        """VERSION with QEMU's default capabilities (or the given ones)."""
        caps = (
            capabilities
            if capabilities is not None
            else {
                uapi.CAP_MAX_FDS: uapi.SERVER_MAX_FDS,
                uapi.CAP_MAX_XFER: uapi.DEFAULT_MAX_XFER,
                uapi.CAP_PGSIZES: uapi.DEFAULT_PGSIZE,
                uapi.CAP_MAX_DMA_MAPS: uapi.DEFAULT_MAX_DMA_MAPS,
                uapi.CAP_WRITE_MULTIPLE: True,
            }
        )
        text = json.dumps({uapi.CAP_ROOT: caps}).encode() + b"\0"
        body = uapi.VERSION_BODY.pack(uapi.VERSION_MAJOR, uapi.VERSION_MINOR) + text
        reply = await self.call(uapi.Command.VERSION, body)
        document = json.loads(reply[uapi.VERSION_BODY.size :].rstrip(b"\0"))
        self.server_capabilities = document[uapi.CAP_ROOT]

    async def dma_map(
        self,
        gpa: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        flags: int = uapi.DMA_MAP_READ | uapi.DMA_MAP_WRITE,
    ) -> None:
        """DMA_MAP ``[gpa, gpa+size)`` backed by ``fd`` at ``offset`` (fd is lent, not closed)."""
        payload = uapi.DMA_MAP.pack(uapi.DMA_MAP.size, flags, offset, gpa, size)
        await self.call(uapi.Command.DMA_MAP, payload, [fd] if fd is not None else [])

    async def dma_unmap(self, gpa: int, size: int, flags: int = 0) -> None:
        """DMA_UNMAP (``flags`` may be DMA_UNMAP_ALL with gpa = size = 0)."""
        payload = uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, flags, gpa, size)
        await self.call(uapi.Command.DMA_UNMAP, payload)

    async def device_info(self) -> tuple[int, int, int]:
        """DEVICE_GET_INFO as ``(flags, num_regions, num_irqs)``."""
        payload = uapi.DEVICE_INFO.pack(uapi.DEVICE_INFO.size, 0, 0, 0)
        _, flags, regions, irqs = uapi.DEVICE_INFO.unpack_from(
            await self.call(uapi.Command.DEVICE_GET_INFO, payload)
        )
        return flags, regions, irqs

    async def region_info(self, index: int, argsz: int = uapi.REGION_INFO.size) -> RegionInfo:
        """DEVICE_GET_REGION_INFO for region ``index``, with room for ``argsz`` bytes.

        :raises ClientError: the server replied with an error.
        """
        payload = uapi.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
        reply = await self.request(uapi.Command.DEVICE_GET_REGION_INFO, payload)
        assert reply is not None
        fds = reply.take_fds()
        if reply.flags & uapi.MsgFlag.ERROR:
            close_fds(fds)
            raise ClientError(uapi.Command.DEVICE_GET_REGION_INFO, reply.error)
        for extra in fds[1:]:
            os.close(extra)
        got_argsz, flags, got_index, cap_offset, size, offset = uapi.REGION_INFO.unpack_from(
            reply.payload)
        caps = reply.payload[uapi.REGION_INFO.size :]
        return RegionInfo(flags, got_index, size, offset, got_argsz, cap_offset, caps,
                          fds[0] if fds else None)

    async def irq_info(self, index: int) -> IrqInfo:
        """DEVICE_GET_IRQ_INFO for IRQ index ``index``."""
        payload = uapi.IRQ_INFO.pack(uapi.IRQ_INFO.size, 0, index, 0)
        reply = await self.call(uapi.Command.DEVICE_GET_IRQ_INFO, payload)
        _, flags, got_index, count = uapi.IRQ_INFO.unpack_from(reply)
        return IrqInfo(flags, got_index, count)

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int = 0,
        count: int = 0,
        fds: Sequence[int] = (),
        data: bytes = b"",
    ) -> None:
        """DEVICE_SET_IRQS (fds are lent, not closed)."""
        payload = uapi.IRQ_SET.pack(uapi.IRQ_SET.size + len(data), flags, index, start, count)
        await self.call(uapi.Command.DEVICE_SET_IRQS, payload + data, fds)

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ; returns the data."""
        payload = uapi.REGION_RW.pack(offset, region, count)
        reply = await self.call(uapi.Command.REGION_READ, payload)
        return reply[uapi.REGION_RW.size :]

    async def region_write(
        self, region: int, offset: int, data: bytes, posted: bool = False
    ) -> None:
        """REGION_WRITE; ``posted`` sets NO_REPLY and returns without waiting."""
        payload = uapi.REGION_RW.pack(offset, region, len(data)) + data
        if posted:
            flags = uapi.MSG_TYPE_REQUEST | uapi.MsgFlag.NO_REPLY
            await self.request(uapi.Command.REGION_WRITE, payload, flags=flags)
        else:
            await self.call(uapi.Command.REGION_WRITE, payload)

    async def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> None:
        """Posted REGION_WRITE_MULTI of ``(region, offset, data<=8 bytes)`` entries."""
        body = uapi.WRITE_MULTI_COUNT.pack(len(writes)) + b"".join(
            uapi.WRITE_MULTI_ONE.pack(offset, region, len(data), data)
            for region, offset, data in writes
        )
        flags = uapi.MSG_TYPE_REQUEST | uapi.MsgFlag.NO_REPLY
        await self.request(uapi.Command.REGION_WRITE_MULTI, body, flags=flags)

    async def reset(self) -> None:
        """DEVICE_RESET."""
        await self.call(uapi.Command.DEVICE_RESET)
