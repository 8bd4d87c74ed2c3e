"""virtio-blk (virtio block device, id 2) over a raw image file.

One request queue.  A request is a chain of device-readable bytes (the
16-byte ``virtio_blk_outhdr``, then the data of a write) followed by
device-writable bytes (the data of a read or of GET_ID, then one status
byte); the framing of those bytes into descriptors is the driver's choice
(virtio 1.2 §5.2.6.1), so the header may be split and the status byte may
share a descriptor with data.  Served: IN, OUT, FLUSH, GET_ID; anything else
completes with UNSUPP.

Data moves between the file and guest RAM without a copy: the data
descriptors are translated into host views of guest memory through the DMA
port (every page checked by the vSMMU before any byte moves) and handed to
``os.preadv``/``os.pwritev``.  The header and status byte go through the
port's ordinary read and write.

Hostile requests cost nothing and lose nothing: a sector range past the
end of the image, a length that is not whole sectors, a segment larger than
``size_max`` or more segments than ``seg_max``, a write to a read-only image,
a data-less GET_ID and a host I/O error complete with IOERR; the queue and
the image go on.  A chain with no device-writable byte (nowhere to put the
status) or with readable bytes after writable ones is malformed: the
transport sets DEVICE_NEEDS_RESET, as QEMU's virtio-blk does.  A refused DMA
stops the request before any data moves and leaves it on the ring.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import EndpointSpecError, spec_bool
from vsmmu.endpoints.virtio_pci import VirtioPciEndpoint
from vsmmu.endpoints.virtqueue import DescriptorChain, VirtqueueError

logger = logging.getLogger(__name__)

REQUESTQ = 0
#: Ring size offered; the driver may program a smaller power of two.
QUEUE_MAX_SIZE = 256
#: Data segments per request: the ring minus the header and status descriptors (as QEMU).
SEG_MAX = QUEUE_MAX_SIZE - 2
#: Largest data segment the device accepts.
SIZE_MAX = 1 << 20
#: ``os.preadv``/``os.pwritev`` take at most this many buffers per call (Linux UIO_MAXIOV).
IOV_MAX = 1024
#: GET_ID answer when the spec gives no ``serial``: ``vsmmu-`` + the endpoint name.
SERIAL_PREFIX = "vsmmu-"

_OUTHDR = struct.Struct(vu.VIRTIO_BLK_OUTHDR_FORMAT)
_CONFIG = struct.Struct(vu.VIRTIO_BLK_CONFIG_FORMAT)
_SECTOR = vu.VIRTIO_BLK_SECTOR_SIZE


class Segment(NamedTuple):
    """A run of guest bytes at an IOVA (part of a descriptor)."""

    addr: int
    length: int


class _RequestError(Exception):
    """A request the device refuses with ``status`` (never escapes :meth:`handle_request`)."""

    def __init__(self, status: vu.BlkStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclasses.dataclass(frozen=True)
class BlkRequest:
    """A chain split into the virtio-blk parts."""

    readable: tuple[Segment, ...]
    data_in: tuple[Segment, ...]
    status_addr: int

    @classmethod
    def from_chain(cls, chain: DescriptorChain) -> BlkRequest:
        """Split ``chain``; the status byte is the last device-writable byte.

        :raises VirtqueueError: no device-writable byte, or a readable buffer after a
            writable one (the spec's order is all readable, then all writable).
        """
        readable: list[Segment] = []
        writable: list[Segment] = []
        for descriptor in chain.descriptors:
            if descriptor.device_writable:
                if descriptor.length:
                    writable.append(Segment(descriptor.addr, descriptor.length))
            elif writable:
                raise VirtqueueError(
                    f"virtio-blk request (head {chain.head}): a device-readable buffer "
                    f"follows a device-writable one"
                )
            elif descriptor.length:
                readable.append(Segment(descriptor.addr, descriptor.length))
        if not writable:
            raise VirtqueueError(
                f"virtio-blk request (head {chain.head}): no device-writable byte for the status"
            )
        last = writable[-1]
        status_addr = last.addr + last.length - 1
        data_in = writable[:-1]
        if last.length > 1:
            data_in.append(Segment(last.addr, last.length - 1))
        return cls(tuple(readable), tuple(data_in), status_addr)

    @property
    def in_length(self) -> int:
        """Device-writable bytes before the status byte."""
        return sum(segment.length for segment in self.data_in)


def _skip(segments: tuple[Segment, ...], count: int) -> tuple[Segment, ...]:
    """``segments`` without their first ``count`` bytes."""
    rest: list[Segment] = []
    for segment in segments:
        if count >= segment.length:
            count -= segment.length
            continue
        rest.append(Segment(segment.addr + count, segment.length - count))
        count = 0
    return tuple(rest)


class VirtioBlk(VirtioPciEndpoint):
    """A block device over a raw image: read, write, flush, get-id."""

    KIND = "virtio-blk"

    def __init__(self, name: str = "virtio-blk0", *, path: Path, readonly: bool = False,
                 serial: str | None = None, ats: bool = False) -> None:
        serial = serial if serial is not None else SERIAL_PREFIX + name
        encoded = serial.encode()
        if len(encoded) > vu.VIRTIO_BLK_ID_BYTES:
            raise EndpointSpecError(
                f"virtio-blk serial {serial!r}: {len(encoded)} bytes, expected at most "
                f"{vu.VIRTIO_BLK_ID_BYTES}"
            )
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as exc:
            mode = "read-only" if readonly else "read-write"
            raise EndpointSpecError(
                f"virtio-blk file {str(path)!r}: cannot open {mode}: {exc.strerror}"
            ) from None
        size = os.fstat(fd).st_size
        if size < _SECTOR:
            os.close(fd)
            raise EndpointSpecError(
                f"virtio-blk file {str(path)!r}: {size} bytes, expected at least one "
                f"{_SECTOR}-byte sector"
            )
        if size % _SECTOR:
            logger.warning("%s: %s is %d bytes; the last %d (a partial sector) are not used",
                           name, path, size, size % _SECTOR)
        self.path = path
        self.fd = fd
        self.readonly = readonly
        self.serial = encoded
        self.capacity = size // _SECTOR
        # Counters (QMP, tests).
        self.sectors_read = 0
        self.sectors_written = 0
        self.flushes = 0
        self.errors = 0
        features = sum(1 << bit for bit in (vu.BlkFeature.SIZE_MAX, vu.BlkFeature.SEG_MAX,
                                             vu.BlkFeature.BLK_SIZE, vu.BlkFeature.FLUSH))
        if readonly:
            features |= 1 << vu.BlkFeature.RO
        super().__init__(name, vu.VirtioDeviceId.BLOCK, num_queues=1, device_features=features,
                         queue_max_size=QUEUE_MAX_SIZE, class_code=vu.PCI_CLASS_STORAGE_SCSI,
                         ats=ats)

    @classmethod
    def from_options(cls, spec: str, options: dict[str, str]) -> VirtioBlk:
        """Build from spec options ``file`` (required), ``readonly``, ``serial``, ``ats``, ``name``.

        :raises EndpointSpecError: an unknown option, no ``file``, a bad value, or an
            image that cannot be opened.
        """
        known = {"file", "readonly", "serial", "ats", "name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EndpointSpecError(
                f"endpoint spec {spec!r}: unknown option(s) {unknown}, expected {sorted(known)}"
            )
        if not options.get("file"):
            raise EndpointSpecError(f"endpoint spec {spec!r}: expected file=PATH (a raw image)")
        return cls(
            options.get("name", "virtio-blk0"),
            path=Path(options["file"]),
            readonly=spec_bool(spec, "readonly", options.get("readonly", "off")),
            serial=options.get("serial"),
            ats=spec_bool(spec, "ats", options.get("ats", "off")),
        )

    def device_config(self) -> bytes:
        """``virtio_blk_config`` up to ``blk_size`` (no geometry, 512-byte blocks)."""
        return _CONFIG.pack(self.capacity, SIZE_MAX, SEG_MAX, 0, 0, 0, _SECTOR)

    def close(self) -> None:
        """Close the image (the endpoint serves nothing afterwards)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests ------------------------------------------------------------------

    def handle_request(self, queue: int, chain: DescriptorChain) -> int:
        """Serve one request and write its status; the bytes written into its buffers."""
        request = BlkRequest.from_chain(chain)
        try:
            status, written = self._serve(request)
        except _RequestError as exc:
            self.errors += 1
            logger.warning("%s: request (head %d) -> %s: %s",
                           self.name, chain.head, exc.status.name, exc)
            status, written = exc.status, 0
        self.dma.write(request.status_addr, bytes([status]))
        return written + 1

    def _serve(self, request: BlkRequest) -> tuple[vu.BlkStatus, int]:
        header_length = vu.VIRTIO_BLK_OUTHDR_SIZE
        if sum(segment.length for segment in request.readable) < header_length:
            raise _RequestError(vu.BlkStatus.IOERR, "request header shorter than 16 bytes")
        header = self._gather(request.readable, header_length)
        kind, _reserved, sector = _OUTHDR.unpack(header)
        data_out = _skip(request.readable, header_length)
        if kind == vu.BlkRequestType.IN:
            return vu.BlkStatus.OK, self._read(sector, request.data_in)
        if kind == vu.BlkRequestType.OUT:
            self._write(sector, data_out)
            return vu.BlkStatus.OK, 0
        if kind == vu.BlkRequestType.FLUSH:
            self._flush()
            return vu.BlkStatus.OK, 0
        if kind == vu.BlkRequestType.GET_ID:
            return vu.BlkStatus.OK, self._get_id(request.data_in)
        raise _RequestError(vu.BlkStatus.UNSUPP, f"request type {kind:#x} not supported")

    def _gather(self, segments: tuple[Segment, ...], length: int) -> bytes:
        """The first ``length`` bytes of ``segments`` (through the DMA port)."""
        parts: list[bytes] = []
        for segment in segments:
            if length <= 0:
                break
            take = min(length, segment.length)
            parts.append(self.dma.read(segment.addr, take))
            length -= take
        return b"".join(parts)

    def _byte_range(self, sector: int, segments: tuple[Segment, ...], verb: str) -> int:
        """The image offset for a transfer of ``segments`` at ``sector``, after the checks."""
        length = sum(segment.length for segment in segments)
        if len(segments) > SEG_MAX or any(s.length > SIZE_MAX for s in segments):
            raise _RequestError(vu.BlkStatus.IOERR,
                                f"{verb} of {len(segments)} segments beyond seg_max {SEG_MAX} "
                                f"or size_max {SIZE_MAX:#x}")
        if length % _SECTOR:
            raise _RequestError(vu.BlkStatus.IOERR,
                                f"{verb} of {length} bytes, expected whole {_SECTOR}-byte sectors")
        if sector > self.capacity or length // _SECTOR > self.capacity - sector:
            raise _RequestError(vu.BlkStatus.IOERR,
                                f"{verb} of {length // _SECTOR} sectors at sector {sector}, "
                                f"beyond the {self.capacity}-sector image")
        return sector * _SECTOR

    def _views(self, segments: tuple[Segment, ...], *, write: bool) -> list[memoryview]:
        views: list[memoryview] = []
        for segment in segments:
            views.extend(self.dma.views(segment.addr, segment.length, write=write))
        return views

    def _read(self, sector: int, segments: tuple[Segment, ...]) -> int:
        offset = self._byte_range(sector, segments, "read")
        views = self._views(segments, write=True)  # translated before any byte moves
        moved = self._transfer(views, offset, into_guest=True)
        self.sectors_read += moved // _SECTOR
        return moved

    def _write(self, sector: int, segments: tuple[Segment, ...]) -> None:
        if self.readonly:
            raise _RequestError(vu.BlkStatus.IOERR,
                                f"write at sector {sector} to a read-only image")
        offset = self._byte_range(sector, segments, "write")
        views = self._views(segments, write=False)
        moved = self._transfer(views, offset, into_guest=False)
        self.sectors_written += moved // _SECTOR

    def _transfer(self, views: list[memoryview], offset: int, *, into_guest: bool) -> int:
        """Move all of ``views`` to or from the image at ``offset``; short counts resumed."""
        total = sum(len(view) for view in views)
        moved = 0
        pending = views
        while pending:
            batch = pending[:IOV_MAX]
            try:
                if into_guest:
                    count = os.preadv(self.fd, batch, offset + moved)
                else:
                    count = os.pwritev(self.fd, batch, offset + moved)
            except OSError as exc:
                raise _RequestError(vu.BlkStatus.IOERR,
                                    f"host I/O at byte {offset + moved}: {exc.strerror}") from None
            if count == 0:
                raise _RequestError(vu.BlkStatus.IOERR,
                                    f"image ended at byte {offset + moved} (shrunk on the host?)")
            moved += count
            pending = _advance(pending, count)
        assert moved == total
        return moved

    def _flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _RequestError(vu.BlkStatus.IOERR, f"flush: {exc.strerror}") from None
        self.flushes += 1

    def _get_id(self, segments: tuple[Segment, ...]) -> int:
        if not segments:
            raise _RequestError(vu.BlkStatus.IOERR, "GET_ID with no buffer for the id")
        answer = self.serial.ljust(vu.VIRTIO_BLK_ID_BYTES, b"\0")
        done = 0
        for segment in segments:
            piece = answer[done : done + segment.length]
            if not piece:
                break
            self.dma.write(segment.addr, piece)
            done += len(piece)
        return done

    def stats(self) -> dict[str, Any]:
        """Transport counters plus the image and what was done to it."""
        return {**super().stats(), "file": str(self.path), "readonly": self.readonly,
                "capacity": self.capacity, "sectors_read": self.sectors_read,
                "sectors_written": self.sectors_written, "flushes": self.flushes,
                "errors": self.errors}


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` after their first ``count`` bytes."""
    for index, view in enumerate(views):
        if count < len(view):
            return [view[count:], *views[index + 1 :]]
        count -= len(view)
    return []
