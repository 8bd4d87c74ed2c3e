"""The REGION_READ/REGION_WRITE fast path answers exactly as the generic dispatch.

With the session's trace logger at DEBUG every request takes the generic
path; otherwise BAR accesses take the fast one.  Hypothesis-generated
requests (good and bad flags, regions, offsets, counts, payload lengths, a
handler that fails or returns the wrong size) go through both, on two
identical devices: replies on the wire, statistics and the device's calls must
be the same.
"""

from __future__ import annotations

import logging
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
_TRACE = logging.getLogger("vsmmu.vfio_user.session.trace")


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
        return (offset * 0x01010101) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset, data))


def make_session() -> tuple[Session, RecordingBar]:
    bar = RecordingBar()
    device = PciDevice(SAMPLE_IDENTITY, {uapi.PciRegion.BAR0: BarRegion(BAR_SIZE, bar.read,
                                                                         bar.write)})
    session = Session(device)
    session.negotiated = True
    return session, bar


def wire(reply: Message | None) -> bytes | None:
    return None if reply is None else reply.encode()


REQUEST = st.builds(
    lambda command, flags, offset, region, count, extra, msg_id: Message(
        msg_id, command, flags, 0,
        struct.pack("<QII", offset, region, count)
        + bytes(count if command == uapi.Command.REGION_WRITE else 0)[: max(0, count + extra)]
        + bytes(max(0, extra))),
    st.sampled_from([uapi.Command.REGION_READ, uapi.Command.REGION_WRITE]),
    st.sampled_from([0, int(uapi.MsgFlag.NO_REPLY), int(uapi.MsgFlag.ERROR),
                     uapi.MSG_TYPE_REPLY, 0x80]),
    st.one_of(st.sampled_from([0, 4, BAD_LENGTH_OFFSET, FAILING_OFFSET, BAR_SIZE - 4]),
              st.integers(0, (1 << 64) - 1)),
    st.sampled_from([0, 1, int(uapi.PciRegion.CONFIG), uapi.PCI_NUM_REGIONS]),
    st.sampled_from([1, 2, 4, 8, BAR_SIZE + 1]),
    st.integers(-2, 2),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=300)
@given(request=REQUEST)
def test_fast_path_equals_generic_dispatch(request: Message) -> None:
    fast_session, fast_bar = make_session()
    generic_session, generic_bar = make_session()
    fast = fast_session.handle(Message(request.msg_id, request.command, request.flags, 0,
                                       request.payload))
    level = _TRACE.level
    _TRACE.setLevel(logging.DEBUG)
    try:
        generic = generic_session.handle(request)
    finally:
        _TRACE.setLevel(level)
    assert wire(fast) == wire(generic)
    assert fast_session.stats == generic_session.stats
    assert fast_bar.calls == generic_bar.calls


def test_register_read_and_posted_write_take_effect() -> None:
    session, bar = make_session()
    read = session.handle(Message(1, uapi.Command.REGION_READ, 0, 0,
                                  struct.pack("<QII", 4, 0, 4)))
    assert read is not None and read.payload == struct.pack("<QII", 4, 0, 4) + struct.pack(
        "<I", 4 * 0x01010101)
    posted = session.handle(Message(2, uapi.Command.REGION_WRITE, int(uapi.MsgFlag.NO_REPLY), 0,
                                    struct.pack("<QII", 8, 0, 4) + b"\x01\x02\x03\x04"))
    assert posted is None
    assert bar.calls == [("read", 4, 4), ("write", 8, b"\x01\x02\x03\x04")]
    assert session.stats == {"REGION_READ": 1, "REGION_WRITE": 1, "posted": 1}
