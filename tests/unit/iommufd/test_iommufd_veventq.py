"""The sim vEVENTQ: a real fd with the kernel's record format, sequence and overflow rules."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from vsmmu.iommufd import uapi
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.iommufd.veventq import SimVeventQueue

EVENT = bytes(range(uapi.VEVENT_ARM_SMMUV3_SIZE))


def read_all(fd: int) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(os.read(fd, 4096))
        except BlockingIOError:
            return out


def test_records_are_whole_header_plus_event() -> None:
    q = SimVeventQueue(4)
    q.report(EVENT)
    q.report(EVENT)
    recs = read_all(q.reader_fd)
    assert [len(r) for r in recs] == [uapi.VEVENT_HEADER_SIZE + uapi.VEVENT_ARM_SMMUV3_SIZE] * 2
    assert [struct.unpack_from("<II", r) for r in recs] == [(0, 0), (0, 1)]
    assert recs[0][uapi.VEVENT_HEADER_SIZE :] == EVENT
    os.close(q.reader_fd)
    q.close()


def test_overflow_queues_one_lost_events_header_then_resumes() -> None:
    q = SimVeventQueue(2)
    for _ in range(5):
        q.report(EVENT)
    recs = read_all(q.reader_fd)
    headers = [struct.unpack_from("<II", r) for r in recs]
    assert headers == [(0, 0), (0, 1), (uapi.VeventqFlag.LOST_EVENTS, 2)]
    assert len(recs[2]) == uapi.VEVENT_HEADER_SIZE
    q.report(EVENT)  # the reader drained the queue: events flow again
    assert struct.unpack_from("<II", read_all(q.reader_fd)[0]) == (0, 3)
    os.close(q.reader_fd)
    q.close()


def test_sequence_wraps_after_int_max() -> None:
    q = SimVeventQueue(4)
    q.sequence = uapi.VEVENTQ_SEQUENCE_MASK
    q.report(EVENT)
    q.report(EVENT)
    seqs = [struct.unpack_from("<II", r)[1] for r in read_all(q.reader_fd)]
    assert seqs == [uapi.VEVENTQ_SEQUENCE_MASK, 0]
    os.close(q.reader_fd)
    q.close()


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
