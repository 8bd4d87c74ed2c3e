"""REGION_READ/REGION_WRITE: the session's one region-access path against the protocol's rules.

Hypothesis-generated requests (good and bad flags, regions, offsets, counts,
payload lengths, fds, a BAR handler that fails or returns the wrong size) go
to a session; a reference written from the vfio-user specification and
libvfio-user's ``is_valid_region_access`` says what must come back: the
reply on the wire (or none for NO_REPLY), the statistics, and which calls
reached the BAR handlers.  The reference never calls the session.
"""

from __future__ import annotations

import errno
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.device import BarRegion, PciDevice
from vsmmu.vfio_user.messages import Message
from vsmmu.vfio_user.sample import SAMPLE_IDENTITY
from vsmmu.vfio_user.session import Session

BAR_SIZE = 0x100
BAD_LENGTH_OFFSET = 0x80
FAILING_OFFSET = 0xC0
HEADER = struct.Struct("<QII")  # offset, region, count (vfio_user_region_access)
NO_REPLY = 0x10  # vfio-user header flags bit 4
ERROR = 0x20  # bit 5
REPLY_TYPE = 0x1
REGION_READ = 9
REGION_WRITE = 10
CONFIG_REGION = 7
REGIONS = 9


def register_value(offset: int, size: int) -> int:
    return (offset * 0x01010101) & ((1 << (8 * size)) - 1)


class RecordingBar:
    """A BAR whose handlers record calls; two offsets misbehave on read."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bytes | int]] = []

    def read(self, offset: int, size: int) -> int | bytes:
        self.calls.append(("read", offset, size))
        if offset == FAILING_OFFSET:
            raise RuntimeError("device model bug")
        if offset == BAD_LENGTH_OFFSET:
            return bytes(size + 1)
        return register_value(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset, data))


def make_session() -> tuple[Session, RecordingBar]:
    bar = RecordingBar()
    device = PciDevice(SAMPLE_IDENTITY, {uapi.PciRegion.BAR0: BarRegion(BAR_SIZE, bar.read,
                                                                         bar.write)})
    session = Session(device)
    session.negotiated = True
    return session, bar


def reference(command: int, flags: int, payload: bytes, nfds: int, config: bytes,
              max_xfer: int) -> tuple[int | None, bytes, list[tuple[str, int, bytes | int]]]:
    """(errno or None for success, reply payload, BAR calls) the rules give for one request."""
    if flags not in (0, NO_REPLY):
        return errno.EINVAL, b"", []
    if nfds or len(payload) < HEADER.size:
        return errno.EINVAL, b"", []
    offset, region, count = HEADER.unpack_from(payload)
    data = payload[HEADER.size:]
    if command == REGION_WRITE and len(data) != count:
        return errno.EINVAL, b"", []
    sizes = {0: BAR_SIZE, CONFIG_REGION: len(config)}
    if region >= REGIONS or region not in sizes:
        return errno.EINVAL, b"", []
    if count > max_xfer:
        return errno.E2BIG, b"", []
    if offset + count > sizes[region]:
        return errno.EINVAL, b"", []
    header = payload[:HEADER.size]
    if command == REGION_WRITE:
        return None, header, [("write", offset, data)] if region == 0 else []
    if region == CONFIG_REGION:
        return None, header + config[offset:offset + count], []
    calls: list[tuple[str, int, bytes | int]] = [("read", offset, count)]
    if offset in (FAILING_OFFSET, BAD_LENGTH_OFFSET):
        return errno.EIO, b"", calls
    return None, header + register_value(offset, count).to_bytes(count, "little"), calls


REQUEST = st.tuples(
    st.sampled_from([REGION_READ, REGION_WRITE]),
    st.sampled_from([0, NO_REPLY, ERROR, REPLY_TYPE, 0x80, NO_REPLY | REPLY_TYPE]),
    st.one_of(st.sampled_from([0, 4, BAD_LENGTH_OFFSET, FAILING_OFFSET, BAR_SIZE - 4]),
              st.integers(0, (1 << 64) - 1)),
    st.sampled_from([0, 1, CONFIG_REGION, REGIONS]),
    st.sampled_from([1, 2, 4, 8, BAR_SIZE + 1]),
    st.integers(-2, 2),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 0, 0, 1]),
)


@settings(max_examples=400)
@given(request=REQUEST)
def test_region_access_follows_the_rules(
        request: tuple[int, int, int, int, int, int, int, int]) -> None:
    command, flags, offset, region, count, extra, msg_id, nfds = request
    data = bytes(i & 0xFF for i in range(count)) if command == REGION_WRITE else b""
    payload = HEADER.pack(offset, region, count) + data[: max(0, count + extra)] \
        + bytes(max(0, extra))
    session, bar = make_session()
    config = bytes(session.device.config.read(0, session.device.config.size))
    expected_errno, expected_payload, expected_calls = reference(
        command, flags, payload, nfds, config, session.max_xfer)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    reply = session.handle(Message(msg_id, command, flags, 0, payload, list(fds)))
    for fd in fds:  # the session closed every fd it was given
        try:
            os.fstat(fd)
            raise AssertionError(f"fd {fd} left open")
        except OSError:
            pass
    if flags & NO_REPLY:
        assert reply is None
    else:
        assert reply is not None
        assert (reply.msg_id, reply.command) == (msg_id, command)
        if expected_errno is None:
            assert (reply.flags, reply.error, reply.payload) == (REPLY_TYPE, 0, expected_payload)
        else:
            assert (reply.flags, reply.error, reply.payload) == (REPLY_TYPE | ERROR,
                                                                 expected_errno, b"")
    assert bar.calls == expected_calls
    name = "REGION_READ" if command == REGION_READ else "REGION_WRITE"
    expected_stats = {name: 1}
    if flags & NO_REPLY:
        expected_stats["posted"] = 1
    # A handler that raises is a device failure (EIO, logged), not a refusal; a read
    # handler giving the wrong length is refused with EIO.
    crashed = command == REGION_READ and expected_calls and offset == FAILING_OFFSET
    if expected_errno is not None and not crashed:
        expected_stats["refused"] = 1
    assert dict(session.stats) == expected_stats


def test_register_read_and_posted_write_take_effect() -> None:
    session, bar = make_session()
    read = session.handle(Message(1, REGION_READ, 0, 0, HEADER.pack(4, 0, 4)))
    assert read is not None and read.payload == HEADER.pack(4, 0, 4) + struct.pack(
        "<I", 4 * 0x01010101)
    posted = session.handle(Message(2, REGION_WRITE, NO_REPLY, 0,
                                    HEADER.pack(8, 0, 4) + b"\x01\x02\x03\x04"))
    assert posted is None
    assert bar.calls == [("read", 4, 4), ("write", 8, b"\x01\x02\x03\x04")]
    assert session.stats == {"REGION_READ": 1, "REGION_WRITE": 1, "posted": 1}
