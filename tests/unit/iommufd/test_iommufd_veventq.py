"""The sim vEVENTQ: a real fd with the kernel's record format, sequence and overflow rules."""

from __future__ import annotations

import errno
import os
import select
import struct
from collections.abc import Callable, Iterator

import pytest

from vsmmu.iommufd import uapi
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.iommufd.veventq import SimVeventQueue

EVENT = bytes(range(uapi.VEVENT_ARM_SMMUV3_SIZE))


HEADER = uapi.VEVENT_HEADER_SIZE
RECORD = HEADER + uapi.VEVENT_ARM_SMMUV3_SIZE
LOST = uapi.VeventqFlag.LOST_EVENTS


def headers(data: bytes) -> list[tuple[int, int]]:
    """(flags, sequence) of each record in ``data``, walked by the uapi's sizes."""
    out = []
    offset = 0
    while offset < len(data):
        flags, sequence = struct.unpack_from("<II", data, offset)
        out.append((flags, sequence))
        offset += HEADER if flags & LOST else RECORD
    assert offset == len(data)
    return out


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.fixture
def queue() -> Iterator[Callable[[int], SimVeventQueue]]:
    made: list[SimVeventQueue] = []

    def make(depth: int) -> SimVeventQueue:
        made.append(SimVeventQueue(depth))
        return made[-1]

    yield make
    for q in made:
        os.close(q.reader_fd)
        q.close()


def test_one_read_returns_every_whole_record_that_fits(
        queue: Callable[[int], SimVeventQueue]) -> None:
    """eventq.c iommufd_veventq_fops_read: it loops over the list while records fit."""
    q = queue(4)
    for _ in range(3):
        q.report(EVENT)
    data = q.read(2 * RECORD + HEADER)  # room for two records and a header, not a third
    assert headers(data) == [(0, 0), (0, 1)]
    assert data[HEADER:RECORD] == EVENT
    assert headers(q.read(4096)) == [(0, 2)]
    assert q.read(4096) == b""


def test_a_read_too_short_for_the_first_event_is_einval_and_loses_nothing(
        queue: Callable[[int], SimVeventQueue]) -> None:
    """eventq.c: deliver_restore puts the event back; rc -EINVAL as nothing was done."""
    q = queue(4)
    q.report(EVENT)
    with pytest.raises(OSError) as info:
        q.read(RECORD - 1)
    assert info.value.errno == errno.EINVAL
    assert headers(q.read(RECORD)) == [(0, 0)]


def test_a_read_shorter_than_a_header_is_einval(queue: Callable[[int], SimVeventQueue]) -> None:
    q = queue(4)
    with pytest.raises(OSError) as info:
        q.read(HEADER - 1)
    assert info.value.errno == errno.EINVAL


def test_overflow_numbers_every_loss_and_keeps_one_lost_header_last(
        queue: Callable[[int], SimVeventQueue]) -> None:
    """driver.c report_event + iommufd_vevent_handler: each dropped event re-appends the one
    LOST_EVENTS header with the next sequence number."""
    q = queue(2)
    for _ in range(5):
        q.report(EVENT)
    assert headers(q.read(4096)) == [(0, 0), (0, 1), (LOST, 4)]
    assert q.read(4096) == b""
    q.report(EVENT)  # the reader drained the queue: events flow again, numbered on
    assert headers(q.read(4096)) == [(0, 5)]
    assert (q.delivered, q.lost) == (3, 3)


def test_an_event_after_room_is_made_replaces_the_unread_lost_header(
        queue: Callable[[int], SimVeventQueue]) -> None:
    """iommufd_vevent_handler removes the LOST_EVENTS header when it is last and a record is
    appended: the reader learns of the loss from the gap in the sequence numbers."""
    q = queue(2)
    for _ in range(3):
        q.report(EVENT)  # seq 0, 1; the third is lost: LOST seq 2
    assert headers(q.read(RECORD)) == [(0, 0)]  # room for one event
    q.report(EVENT)  # seq 3 replaces the LOST header
    assert headers(q.read(4096)) == [(0, 1), (0, 3)]


def test_sequence_wraps_after_int_max(queue: Callable[[int], SimVeventQueue]) -> None:
    q = queue(4)
    q.sequence = uapi.VEVENTQ_SEQUENCE_MASK
    q.report(EVENT)
    q.report(EVENT)
    assert headers(q.read(4096)) == [(0, uapi.VEVENTQ_SEQUENCE_MASK), (0, 0)]


def test_the_fd_polls_readable_exactly_while_records_are_queued(
        queue: Callable[[int], SimVeventQueue]) -> None:
    """eventq.c iommufd_eventq_fops_poll: EPOLLIN iff the deliver list is not empty."""
    q = queue(1)
    assert not readable(q.reader_fd)
    q.report(EVENT)
    q.report(EVENT)  # lost
    assert readable(q.reader_fd)
    assert headers(q.read(RECORD)) == [(0, 0)]
    assert readable(q.reader_fd)  # the LOST_EVENTS header is still queued
    assert headers(q.read(4096)) == [(LOST, 1)]
    assert not readable(q.reader_fd)


def test_1000_alloc_destroy_cycles_leak_no_fd(open_fds: Callable[[], int]) -> None:
    sim = SimIommufd()
    dev = sim.create_mock_device(1)
    s2 = sim.hwpt_alloc(dev, sim.ioas_alloc(), flags=uapi.HwptAllocFlags.NEST_PARENT)
    viommu = sim.viommu_alloc(dev, s2)
    before = open_fds()
    for _ in range(1000):
        h = sim.veventq_alloc(viommu, 8)
        os.close(h.fd)
        sim.destroy(h.id)
    assert open_fds() == before
