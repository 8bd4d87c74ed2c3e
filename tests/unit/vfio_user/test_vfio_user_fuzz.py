"""Fuzz the framing and the protocol layer with arbitrary streams and fds.

The stream goes through the same :class:`FrameDecoder` the transport uses,
chunked the way the transport reads (never past the current message), and
every message into :class:`Session.handle`.  Allowed outcomes: a reply, no
reply, or a ProtocolError (the server drops the client).  Nothing else may
escape, and every descriptor sent in must be closed or kept by the device.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.messages import FrameDecoder, Message, ProtocolError
from vsmmu.vfio_user.sample import ScratchDevice
from vsmmu.vfio_user.session import Session

FUZZ_EXAMPLES = 10_000
PAGE = uapi.DEFAULT_PGSIZE

interesting = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9, 16, 20, 24, 32, 0x3F, 0x1000, 0xFFFFFFFF])
field = st.one_of(interesting, st.integers(0, 0xFFFF_FFFF))


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """A message with a correct size and a payload laid out like its command's."""
    command = draw(st.sampled_from([*uapi.REQUEST_BODY, 0, 13, 14, 6, 99, 0xFFFF]))
    flags = draw(st.sampled_from([0, 0x10, 0x1, 0x20, 0x40, 0x2]) | st.integers(0, 0xFFFFFFFF))
    layout = uapi.REQUEST_BODY.get(command)
    body = b""
    if layout is not None:
        values = []
        for code in layout.format.lstrip("<"):
            value = draw(field)
            values.append(value & (0xFFFF if code == "H" else 0xFFFFFFFF) if code != "Q" else value)
        body = layout.pack(*values)
    body += draw(st.binary(max_size=48))
    header = uapi.HEADER.pack(draw(st.integers(0, 0xFFFF)), command, 16 + len(body), flags, 0)
    return header + body


chunk = st.one_of(structured(), st.binary(min_size=1, max_size=64))


def make_fd(kind: int) -> int:
    if kind == 0:
        read, write = os.pipe()
        os.close(write)
        return read
    if kind == 1:
        memfd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4 * PAGE)
        return memfd
    return os.eventfd(0)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def version_message() -> bytes:
    body = uapi.VERSION_BODY.pack(0, 0) + b'{"capabilities":{}}\0'
    return uapi.HEADER.pack(0, uapi.Command.VERSION, 16 + len(body), 0, 0) + body


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    negotiate=st.booleans(),
    chunks=st.lists(st.tuples(chunk, st.lists(st.integers(0, 2), max_size=4)), max_size=6),
)
def test_stream_never_crashes_or_leaks(
    negotiate: bool, chunks: list[tuple[bytes, list[int]]]
) -> None:
    before = open_fd_count()
    device = ScratchDevice()
    session = Session(device.pci)
    decoder = FrameDecoder(session.max_message_size)
    stream: list[tuple[bytes, list[int]]] = [(version_message(), [])] if negotiate else []
    stream += chunks
    replies: list[Message] = []
    for data, fd_kinds in stream:
        fds = [make_fd(kind) for kind in fd_kinds]
        position = 0
        while position < len(data):
            piece = data[position : position + decoder.wanted()]
            position += len(piece)
            try:
                message = decoder.feed(piece, fds)
            except ProtocolError:
                session = Session(device.pci)  # the server drops the client
                device.pci.detach_client()
                decoder = FrameDecoder(session.max_message_size)
                fds = []
                continue
            fds = []
            if message is not None:
                reply = session.handle(message)
                assert not message.fds
                if reply is not None:
                    assert not message.no_reply
                    assert reply.msg_id == message.msg_id
                    replies.append(reply)
        decoder.feed(b"", fds)  # fds with no bytes left: held for the next message
    decoder.reset()
    device.pci.detach_client()
    assert open_fd_count() == before
