"""The simulated vEVENTQ: a real, non-blocking file descriptor with the kernel's records.

The sim hands out one end of an ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair.
Every record is sent as one packet, so a ``read(fd, n)`` with ``n`` at least
``header + event`` bytes returns exactly one whole ``[header][event]`` record
(the kernel may return several per read; a reader that parses records in a
loop until ``EAGAIN`` works with both).  The queue follows
``iommufd_viommu_report_event``:

* at most ``depth`` unread events; an event arriving at a full queue is
  dropped and a single ``LOST_EVENTS`` header (no payload) is queued instead,
  until the reader has consumed it;
* every queued record takes the next sequence number, counting modulo
  ``INT_MAX + 1``.

The unread count is recovered from the reader end's ``FIONREAD`` (for
``SOCK_SEQPACKET`` the total of all queued packets), so no thread is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import logging
import select
import socket
import struct
import termios

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
        self._writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._writer.setblocking(False)
        reader.setblocking(False)
        self.reader_fd = reader.detach()
        # Sizes of records written and not yet known to be read, oldest first,
        # with a flag telling whether each is a LOST_EVENTS header.
        self._unread: collections.deque[tuple[int, bool]] = collections.deque()
        self._unread_bytes = 0
        self.delivered = 0
        self.lost = 0

    def _reconcile(self) -> None:
        """Drop from ``_unread`` the records the reader has consumed."""
        try:
            buf = fcntl.ioctl(self.reader_fd, termios.FIONREAD, b"\0\0\0\0")
            pending = struct.unpack("i", buf)[0]
        except OSError:
            # The reader closed its end: nothing is pending any more.
            pending = 0
        while self._unread and self._unread_bytes > pending:
            size, _ = self._unread.popleft()
            self._unread_bytes -= size

    @property
    def num_events(self) -> int:
        """Unread real events (LOST_EVENTS headers excluded)."""
        self._reconcile()
        return sum(1 for _, lost in self._unread if not lost)

    def _lost_pending(self) -> bool:
        return any(lost for _, lost in self._unread)

    def _send(self, flags: int, payload: bytes, lost: bool) -> bool:
        record = vevent_record(flags, self.sequence, payload if not lost else None)
        try:
            self._writer.send(record)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError) as exc:
            log.warning("vEVENTQ: record seq %d not queued: %s", self.sequence, exc)
            return False
        self.sequence = (self.sequence + 1) & uapi.VEVENTQ_SEQUENCE_MASK
        self._unread.append((len(record), lost))
        self._unread_bytes += len(record)
        return True

    def report(self, event: bytes) -> None:
        """Queue one event record (the ``iommu_vevent_arm_smmuv3`` bytes)."""
        if self.num_events >= self.depth or not self._send(0, event, False):
            self.lost += 1
            if not self._lost_pending():
                self._send(uapi.VeventqFlag.LOST_EVENTS, b"", True)
            return
        self.delivered += 1

    def reader_open(self) -> bool:
        """True while the reader's fd is open (the kernel counts it as a user of the queue)."""
        poller = select.poll()
        poller.register(self._writer, select.POLLOUT)
        return not any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))

    def close(self) -> None:
        """Close the sim's end; the reader sees EOF once it has drained the queue."""
        self._writer.close()
