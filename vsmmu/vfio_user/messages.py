"""vfio-user messages and framing: no sockets, no device knowledge.

A :class:`Message` is one header plus its payload plus the file descriptors
that arrived with it.  :class:`FrameDecoder` turns a byte stream into
messages; the transport asks it how many bytes to read next so that one
``recvmsg`` never spans two messages, which is what ties every descriptor to
exactly the message it was sent with.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from vsmmu.vfio_user import uapi

logger = logging.getLogger(__name__)


class VfioUserError(Exception):
    """Base class of every error this package raises."""


class ProtocolError(VfioUserError):
    """The peer broke the framing; the stream cannot be trusted any more."""


class CommandError(VfioUserError):
    """A request is refused; ``errno`` goes into the error reply."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


def close_fds(fds: list[int]) -> None:
    """Close every descriptor in ``fds`` (ignoring ones already closed) and empty it."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            logger.debug("fd %d was already closed", fd)
    fds.clear()


@dataclasses.dataclass
class Message:
    """One vfio-user message: header fields, payload after the header, fds."""

    msg_id: int
    command: int
    flags: int
    error: int = 0
    payload: bytes = b""
    fds: list[int] = dataclasses.field(default_factory=list)
    #: The kernel truncated this message's SCM_RIGHTS (MSG_CTRUNC): some fds were lost.
    fds_lost: bool = False

    @property
    def is_reply(self) -> bool:
        """True for a reply (type nibble 1), False for a request."""
        return (self.flags & uapi.MSG_TYPE_MASK) == uapi.MSG_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """True when the sender asked for no reply (a posted write)."""
        return bool(self.flags & uapi.MsgFlag.NO_REPLY)

    @property
    def command_name(self) -> str:
        """The command by name, or its number when unknown."""
        try:
            return uapi.Command(self.command).name
        except ValueError:
            return f"command {self.command}"

    def encode(self) -> bytes:
        """Header and payload as they go on the wire (fds travel separately)."""
        size = uapi.HEADER_SIZE + len(self.payload)
        header = uapi.HEADER.pack(self.msg_id, self.command, size, self.flags, self.error)
        return header + self.payload

    def take_fds(self) -> list[int]:
        """Hand the descriptors over to the caller; the message keeps none."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        """Close every descriptor this message still owns."""
        close_fds(self.fds)


def error_reply_to(request: Message, errno_value: int) -> Message:
    """An error reply to ``request`` carrying ``errno_value``."""
    flags = uapi.MSG_TYPE_REPLY | uapi.MsgFlag.ERROR
    return Message(request.msg_id, request.command, flags, errno_value)


class FrameDecoder:
    """Reassembles messages from chunks of a byte stream with their fds.

    Call :meth:`wanted` for the number of bytes to read next, then
    :meth:`feed` with what arrived (at most that many bytes) and the fds that
    came with it.  ``feed`` returns a complete :class:`Message` or None.
    It raises :class:`ProtocolError` on a header that cannot start a
    message; the descriptors it held are closed before it raises.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._size = 0
        self._fds: list[int] = []

    def wanted(self) -> int:
        """Bytes still missing from the header or, once known, the message."""
        if len(self._buffer) < uapi.HEADER_SIZE:
            return uapi.HEADER_SIZE - len(self._buffer)
        return self._size - len(self._buffer)

    @property
    def idle(self) -> bool:
        """True between messages (a disconnect here is clean)."""
        return not self._buffer and not self._fds

    def feed(self, data: bytes, fds: list[int]) -> Message | None:
        """Add ``data`` (no more than :meth:`wanted`) and the fds that came with it."""
        self._fds.extend(fds)
        wanted = self.wanted()
        if len(data) > wanted:
            self.reset()
            raise ProtocolError(f"frame decoder: fed {len(data)} bytes, expected at most {wanted}")
        self._buffer += data
        if len(self._buffer) < uapi.HEADER_SIZE:
            return None
        if self._size == 0:
            _, _, size, _, _ = uapi.HEADER.unpack_from(self._buffer)
            if size < uapi.HEADER_SIZE or size > self.max_message_size:
                self.reset()
                raise ProtocolError(
                    f"message size {size}: expected {uapi.HEADER_SIZE}"
                    f"..{self.max_message_size} bytes"
                )
            self._size = size
        if len(self._buffer) < self._size:
            return None
        msg_id, command, _, flags, error = uapi.HEADER.unpack_from(self._buffer)
        message = Message(
            msg_id, command, flags, error, bytes(self._buffer[uapi.HEADER_SIZE :]), self._fds
        )
        self._buffer = bytearray()
        self._size = 0
        self._fds = []
        return message

    def reset(self) -> None:
        """Drop a partial message and close its descriptors."""
        self._buffer = bytearray()
        self._size = 0
        close_fds(self._fds)
