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
import fcntl
import logging
import select
import socket
import struct
import termios

from vsmmu.iommufd import uapi

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")


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
        record = _HEADER.pack(flags, self.sequence) + payload
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
