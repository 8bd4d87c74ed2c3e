"""Split virtqueues (virtio 1.2 §2.7) read and written only through a DMA port.

Every ring address is an IOVA the driver programmed; the descriptor table,
the available ring and the used ring are reached through the endpoint's
:class:`~vsmmu.endpoints.base.DmaPort`, as are the buffers.  All guest
values are checked before use: the number of new entries cannot exceed the
queue size, a descriptor index must be inside the table, a chain cannot be
longer than the table (which catches loops), buffer ranges cannot wrap the
64-bit space.  A violation raises :class:`VirtqueueError` (the transport then
sets DEVICE_NEEDS_RESET); a refused DMA raises
:class:`~vsmmu.endpoints.base.EndpointDmaError` with the queue unchanged, so
the request is retried at the next notification.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import NamedTuple

from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import DMA_PAGE_SIZE, DmaPort, EndpointError

logger = logging.getLogger(__name__)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
# Plain ints: a chain of 256 descriptors is read per request, and IntFlag arithmetic
# costs microseconds per operation.
_NEXT = int(vu.DescFlag.NEXT)
_WRITE = int(vu.DescFlag.WRITE)
_INDIRECT = int(vu.DescFlag.INDIRECT)


class VirtqueueError(EndpointError):
    """The driver gave a virtqueue the device cannot use (a malformed ring)."""


class Descriptor(NamedTuple):
    """One buffer of a chain."""

    addr: int
    length: int
    device_writable: bool
    """True for a buffer the device fills (driver-readable): ``VIRTQ_DESC_F_WRITE``."""


@dataclasses.dataclass(frozen=True)
class DescriptorChain:
    """A request: the head index the used ring reports, and its buffers in order."""

    head: int
    descriptors: tuple[Descriptor, ...]

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        """The device-writable buffers, in chain order."""
        return tuple(d for d in self.descriptors if d.device_writable)


class SplitVirtqueue:
    """One split virtqueue's configuration and the device's position in it."""

    def __init__(self, index: int, max_size: int, port: Callable[[], DmaPort]) -> None:
        self.index = index
        self.max_size = max_size
        self._port = port
        self.reset()

    def reset(self) -> None:
        """Back to the reset values: size = maximum, addresses 0, disabled."""
        self.size = self.max_size
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.enabled = False
        self.last_avail_idx = 0
        self.used_idx = 0

    # -- configuration -----------------------------------------------------

    def check_layout(self) -> None:
        """Validate what the driver programmed before the queue is enabled.

        :raises VirtqueueError: size not a power of two in 1..max, misaligned
            parts, or a part that wraps the 64-bit address space.
        """
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            raise VirtqueueError(
                f"queue {self.index}: size {size}, expected a power of two <= {self.max_size}"
            )
        parts = (
            ("descriptor table", self.desc, vu.VIRTQ_DESC_ALIGN, vu.VIRTQ_DESC_SIZE * size),
            (
                "available ring",
                self.driver,
                vu.VIRTQ_AVAIL_ALIGN,
                vu.VIRTQ_AVAIL_RING + vu.VIRTQ_AVAIL_ELEM_SIZE * (size + 1),
            ),
            (
                "used ring",
                self.device,
                vu.VIRTQ_USED_ALIGN,
                vu.VIRTQ_USED_RING + vu.VIRTQ_USED_ELEM_SIZE * size + vu.VIRTQ_AVAIL_ELEM_SIZE,
            ),
        )
        for what, address, align, length in parts:
            if address % align or address + length > vu.VIRTQ_ADDRESS_LIMIT:
                raise VirtqueueError(
                    f"queue {self.index}: {what} at {address:#x} (+{length:#x}), expected "
                    f"{align}-byte alignment inside the 64-bit space"
                )

    # -- the rings -------------------------------------------------------------

    def _read_u16(self, iova: int) -> int:
        value: int = _U16.unpack(self._port().read(iova, _U16.size))[0]
        return value

    def pending(self) -> int:
        """How many chains the driver made available that the device has not taken.

        :raises VirtqueueError: the driver's index ran more than a queue ahead.
        :raises EndpointDmaError: the available ring could not be read.
        """
        avail_idx = self._read_u16(self.driver + vu.VIRTQ_AVAIL_IDX)
        count = (avail_idx - self.last_avail_idx) % vu.VIRTQ_IDX_MODULUS
        if count > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {avail_idx} is {count} ahead of the device's "
                f"{self.last_avail_idx}, expected at most the queue size {self.size}"
            )
        return count

    def interrupts_suppressed(self) -> bool:
        """True when the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.

        :raises EndpointDmaError: the available ring could not be read.
        """
        flags = self._read_u16(self.driver + vu.VIRTQ_AVAIL_FLAGS)
        return bool(flags & vu.AvailFlag.NO_INTERRUPT)

    def peek(self) -> DescriptorChain:
        """The next available chain, without consuming it (call when :meth:`pending` > 0).

        :raises VirtqueueError: head or next index outside the table, a chain
            longer than the table (a loop), an indirect descriptor (not
            negotiated), or a buffer that wraps the address space.
        :raises EndpointDmaError: a ring or the descriptor table could not be read.
        """
        slot = self.last_avail_idx % self.size
        head = self._read_u16(self.driver + vu.VIRTQ_AVAIL_RING + vu.VIRTQ_AVAIL_ELEM_SIZE * slot)
        port = self._port()
        table_end = self.desc + vu.VIRTQ_DESC_SIZE * self.size
        # The table is read a page at a time (the part of it inside one DMA page), once per
        # chain: the IOMMU allows or refuses a page whole, so this is refused exactly when
        # reading the descriptor alone would be, and a long chain costs a read per page
        # instead of one per descriptor.
        pages: dict[int, tuple[int, bytes]] = {}
        descriptors: list[Descriptor] = []
        index = head
        while True:
            if index >= self.size:
                raise VirtqueueError(
                    f"queue {self.index}: descriptor index {index} (chain head {head}), "
                    f"expected < queue size {self.size}"
                )
            if len(descriptors) == self.size:
                raise VirtqueueError(
                    f"queue {self.index}: chain from head {head} is longer than the "
                    f"{self.size}-entry table (a loop)"
                )
            address = self.desc + vu.VIRTQ_DESC_SIZE * index
            page = address - address % DMA_PAGE_SIZE
            cached = pages.get(page)
            if cached is None:
                start = max(page, self.desc)
                cached = pages[page] = (start, port.read(
                    start, min(page + DMA_PAGE_SIZE, table_end) - start))
            addr, length, flags, following = _DESC.unpack_from(cached[1], address - cached[0])
            if flags & _INDIRECT:
                raise VirtqueueError(
                    f"queue {self.index}: descriptor {index} is INDIRECT, a feature "
                    f"not negotiated"
                )
            if addr + length > vu.VIRTQ_ADDRESS_LIMIT:
                raise VirtqueueError(
                    f"queue {self.index}: descriptor {index} buffer {addr:#x}+{length:#x} "
                    f"wraps the 64-bit address space"
                )
            descriptors.append(Descriptor(addr, length, bool(flags & _WRITE)))
            if not flags & _NEXT:
                return DescriptorChain(head, tuple(descriptors))
            index = following

    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes filled, and consume it.

        The element is written before the index, so the driver never sees an
        index covering an unwritten element.

        :raises EndpointDmaError: the used ring could not be written (nothing consumed).
        """
        slot = self.used_idx % self.size
        element = _USED_ELEM.pack(chain.head, written)
        port = self._port()
        port.write(self.device + vu.VIRTQ_USED_RING + vu.VIRTQ_USED_ELEM_SIZE * slot, element)
        next_used = (self.used_idx + 1) % vu.VIRTQ_IDX_MODULUS
        port.write(self.device + vu.VIRTQ_USED_IDX, _U16.pack(next_used))
        self.used_idx = next_used
        self.last_avail_idx = (self.last_avail_idx + 1) % vu.VIRTQ_IDX_MODULUS
