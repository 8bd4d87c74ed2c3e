"""The simulated vEVENTQ: the kernel's queue, behind a real, pollable file descriptor.

The queue is the kernel's list (``iommufd_viommu_report_event`` and
``iommufd_vevent_handler``, driver.c and iommufd_private.h):

* at most ``depth`` unread events; an event arriving at a full queue is
  dropped and the one ``LOST_EVENTS`` header (no payload) is appended instead;
* every record appended takes the next sequence number, modulo
  ``INT_MAX + 1`` — a dropped event too, since its LOST_EVENTS header is
  appended anew;
* the LOST_EVENTS header is removed whenever it is the last record and
  another is appended: it is always last, it carries the sequence number of
  the latest loss, and once room is made and an event arrives, the gap in
  the sequence numbers is all that tells of the loss.

Reads follow ``iommufd_veventq_fops_read`` (eventq.c): fewer bytes than a
header is EINVAL; an empty queue reads 0 bytes (it never blocks); a read
returns as many whole records as fit, and EINVAL when not even the first
event fits.  Those rules belong to the kernel's file and no socket or pipe
has them, so the records stay here and are read through :meth:`read`
(``IommufdBackend.veventq_read``).  The fd the user holds is one end of an
``AF_UNIX``/``SOCK_SEQPACKET`` pair on which the sim keeps one byte queued
exactly while the list is not empty: it polls readable when the kernel's does
(``iommufd_eventq_fops_poll``), and the sim sees when the user closes it (the
kernel's DESTROY refuses while it is open).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import select
import socket

from construct import Bytes, ConstructError, If, Int32ul, Struct, this

from vsmmu.iommufd import uapi

log = logging.getLogger(__name__)

VEVENT_HEADER = Struct("flags" / Int32ul, "sequence" / Int32ul)
"""``struct iommufd_vevent_header``."""
VEVENT_RECORD = Struct(
    "header" / VEVENT_HEADER,
    "event" / If(this.header.flags & uapi.VeventqFlag.LOST_EVENTS == 0,
                 Bytes(uapi.VEVENT_ARM_SMMUV3_SIZE)),
)
"""One record a vEVENTQ read returns: the header, then (unless it says LOST_EVENTS) the
``struct iommu_vevent_arm_smmuv3`` event."""


@dataclasses.dataclass(frozen=True)
class VeventRecord:
    """One parsed vEVENTQ record: ``event`` is None for a LOST_EVENTS header."""

    flags: int
    sequence: int
    event: bytes | None


def vevent_record(flags: int, sequence: int, event: bytes | None) -> bytes:
    """The bytes of one record as the kernel queues it."""
    record: bytes = VEVENT_RECORD.build({"header": {"flags": flags, "sequence": sequence},
                                         "event": event})
    return record


def parse_vevent_records(data: bytes) -> tuple[list[VeventRecord], int]:
    """The whole records at the start of ``data`` (what one read returned), and how many
    bytes they took; a truncated last record is left out."""
    records: list[VeventRecord] = []
    offset = 0
    while offset < len(data):
        try:
            parsed = VEVENT_RECORD.parse(data[offset:])
        except ConstructError:
            break
        event = parsed.event
        records.append(VeventRecord(parsed.header.flags, parsed.header.sequence, event))
        offset += VEVENT_HEADER.sizeof() + (len(event) if event is not None else 0)
    return records, offset


class SimVeventQueue:
    """One vEVENTQ of the simulated backend (see the module docstring)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.sequence = 0
        self.num_events = 0
        """Unread events (the LOST_EVENTS header excluded): ``veventq->num_events``."""
        self.delivered = 0
        self.lost = 0
        # The kernel's deliver list: (flags, sequence, event); event None for LOST_EVENTS.
        self._list: collections.deque[tuple[int, int, bytes | None]] = collections.deque()
        self._writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._writer.setblocking(False)
        reader.setblocking(False)
        self.reader_fd = reader.detach()

    def report(self, event: bytes) -> None:
        """Queue one event record (the ``iommu_vevent_arm_smmuv3`` bytes)."""
        if self.num_events == self.depth:
            self.lost += 1
            self._append(uapi.VeventqFlag.LOST_EVENTS, None)
            return
        self.num_events += 1
        self.delivered += 1
        self._append(0, event)

    def _append(self, flags: int, event: bytes | None) -> None:
        """``iommufd_vevent_handler``: the LOST_EVENTS header leaves when it is last."""
        was_empty = not self._list
        if self._list and self._list[-1][2] is None:
            self._list.pop()
        self._list.append((flags, self.sequence, event))
        self.sequence = (self.sequence + 1) & uapi.VEVENTQ_SEQUENCE_MASK
        if was_empty:
            self._ring(True)

    def read(self, count: int) -> bytes:
        """``read(reader_fd, count)`` with the kernel's rules; raises OSError with its errno."""
        if self._writer.fileno() < 0:
            raise OSError(errno.EBADF, "vEVENTQ: the sim closed this queue")
        if count < VEVENT_HEADER.sizeof():
            raise OSError(errno.EINVAL, f"vEVENTQ read of {count} bytes: less than a header")
        records: list[bytes] = []
        done = 0
        while self._list:
            flags, sequence, event = self._list[0]
            size = VEVENT_HEADER.sizeof() + (len(event) if event is not None else 0)
            if size > count - done:
                if done == 0 and event is not None:
                    raise OSError(errno.EINVAL, f"vEVENTQ read of {count} bytes: less than "
                                                f"the first event's {size}")
                break
            self._list.popleft()
            if event is not None:
                self.num_events -= 1
            records.append(vevent_record(flags, sequence, event))
            done += size
        if records and not self._list:
            self._ring(False)
        return b"".join(records)

    def _ring(self, pending: bool) -> None:
        """Keep one byte on the reader's socket exactly while records are pending."""
        try:
            if pending:
                self._writer.send(b"\0")
            else:
                os.read(self.reader_fd, 1)
        except OSError as exc:
            # The reader closed its fd, or read the byte itself: readiness is all it carries.
            log.debug("vEVENTQ doorbell (%s): %s", "ring" if pending else "clear", exc)

    def reader_open(self) -> bool:
        """True while the reader's fd is open (the kernel counts it as a user of the queue)."""
        poller = select.poll()
        poller.register(self._writer, select.POLLOUT)
        return not any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))

    def close(self) -> None:
        """Close the sim's end (the backend is closing or the object is destroyed)."""
        self._writer.close()
