"""The table of guest memory the client mapped for the device's DMA.

QEMU passes one fd per RAM block in DMA_MAP; the table mmaps it and closes the
fd at once (the mapping keeps the memory alive), so no descriptor is ever
held.

A shared mapping of a file faults with SIGBUS when the file is shrunk under
it, and Python cannot survive that signal.  So an fd is mapped only when its
size can no longer drop below the mapped range: the file must already be that
large (``fstat``) and sealed against shrinking (``F_SEAL_SHRINK``; QEMU's
``memory-backend-memfd`` seals by default).  An unsealed memfd that allows
sealing is sealed here; any other fd is refused with EINVAL, because a client
could shrink it under the mapping at any time.

Reads and writes by guest-physical address are bounds-checked against
one mapping; an access that is not wholly inside a mapped, mmap-able range
raises :class:`DmaError`.  Listeners hear of every map and unmap so the
translator can mirror them (for example into an iommufd IOAS).
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.messages import CommandError, VfioUserError

logger = logging.getLogger(__name__)


class DmaError(VfioUserError):
    """A guest-physical access the DMA map table cannot serve."""


@dataclasses.dataclass(eq=False)
class DmaMapping:
    """One DMA_MAP: guest range, permissions, and the mmap of its fd (if any)."""

    gpa: int
    size: int
    readable: bool
    writable: bool
    fd_offset: int
    memory: mmap.mmap | None = None
    #: Offset of ``gpa`` inside ``memory`` (mmap offsets must be page aligned).
    skew: int = 0

    @property
    def end(self) -> int:
        """First guest-physical address past the mapping."""
        return self.gpa + self.size

    @property
    def host_address(self) -> int | None:
        """Host virtual address of ``gpa`` in this process, or None without an mmap."""
        if self.memory is None:
            return None
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        return base + self.skew

    def contains(self, gpa: int, size: int) -> bool:
        """True when ``[gpa, gpa+size)`` lies wholly inside this mapping."""
        return self.gpa <= gpa and gpa + size <= self.end


DmaListener = Callable[[DmaMapping], None]


class DmaMapTable:
    """Guest memory regions mapped by the client, by guest-physical address."""

    def __init__(self, max_mappings: int = uapi.DEFAULT_MAX_DMA_MAPS) -> None:
        self.max_mappings = max_mappings
        self._starts: list[int] = []
        self._mappings: list[DmaMapping] = []
        self._map_listeners: list[DmaListener] = []
        self._unmap_listeners: list[DmaListener] = []

    def __len__(self) -> int:
        return len(self._mappings)

    def __iter__(self) -> Iterator[DmaMapping]:
        return iter(list(self._mappings))

    @property
    def mappings(self) -> list[DmaMapping]:
        """A snapshot of the current mappings, sorted by address."""
        return list(self._mappings)

    def add_listener(
        self, on_map: DmaListener | None = None, on_unmap: DmaListener | None = None
    ) -> None:
        """Call ``on_map``/``on_unmap`` after every map / before every unmap."""
        if on_map is not None:
            self._map_listeners.append(on_map)
        if on_unmap is not None:
            self._unmap_listeners.append(on_unmap)

    def map(self, gpa: int, size: int, flags: int, fd: int | None, fd_offset: int) -> DmaMapping:
        """Record a mapping; ``fd`` is always closed, whether this succeeds or not.

        :raises CommandError: EINVAL for an empty or overflowing range or
            unknown flags, EEXIST for an overlap, ENOSPC past ``max_mappings``,
            or the errno of a failed mmap.
        """
        try:
            mapping = self._checked_mapping(gpa, size, flags, fd_offset)
            if fd is not None:
                self._mmap_into(mapping, fd)
        finally:
            if fd is not None:
                os.close(fd)
        where = bisect.bisect_left(self._starts, gpa)
        self._starts.insert(where, gpa)
        self._mappings.insert(where, mapping)
        logger.debug(
            "dma map gpa=%#x size=%#x %s", gpa, size, "mmap" if mapping.memory else "no fd"
        )
        for listener in self._map_listeners:
            _notify(listener, mapping, "map")
        return mapping

    def _checked_mapping(self, gpa: int, size: int, flags: int, fd_offset: int) -> DmaMapping:
        if flags & ~uapi.DMA_MAP_KNOWN_FLAGS:
            raise CommandError(errno.EINVAL, f"DMA_MAP flags {flags:#x}: unknown bits")
        if size == 0 or gpa + size > 1 << 64:
            raise CommandError(errno.EINVAL, f"DMA_MAP gpa={gpa:#x} size={size:#x}: bad range")
        if len(self._mappings) >= self.max_mappings:
            raise CommandError(errno.ENOSPC, f"DMA_MAP: already {self.max_mappings} mappings")
        where = bisect.bisect_left(self._starts, gpa)
        neighbours = self._mappings[max(where - 1, 0) : where + 1]
        for other in neighbours:
            if other.gpa < gpa + size and gpa < other.end:
                raise CommandError(
                    errno.EEXIST,
                    f"DMA_MAP gpa={gpa:#x} size={size:#x}: overlaps mapping at {other.gpa:#x}",
                )
        return DmaMapping(
            gpa,
            size,
            readable=bool(flags & uapi.DMA_MAP_READ),
            writable=bool(flags & uapi.DMA_MAP_WRITE),
            fd_offset=fd_offset,
        )

    @staticmethod
    def _mmap_into(mapping: DmaMapping, fd: int) -> None:
        _pin_size(mapping, fd)
        skew = mapping.fd_offset % mmap.ALLOCATIONGRANULARITY
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if mapping.writable else 0)
        try:
            mapping.memory = mmap.mmap(
                fd,
                mapping.size + skew,
                flags=mmap.MAP_SHARED,
                prot=prot,
                offset=mapping.fd_offset - skew,
            )
        except (OSError, ValueError, OverflowError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            raise CommandError(
                code, f"DMA_MAP gpa={mapping.gpa:#x}: mmap of fd {fd} failed: {exc}"
            ) from exc
        mapping.skew = skew

    def unmap(self, gpa: int, size: int) -> list[DmaMapping]:
        """Remove every mapping inside ``[gpa, gpa+size)``; return them.

        :raises CommandError: EINVAL when a mapping straddles the range edge.
        """
        doomed = [m for m in self._mappings if m.gpa < gpa + size and gpa < m.end]
        for mapping in doomed:
            if not (gpa <= mapping.gpa and mapping.end <= gpa + size):
                raise CommandError(
                    errno.EINVAL,
                    f"DMA_UNMAP gpa={gpa:#x} size={size:#x}: splits mapping at {mapping.gpa:#x}",
                )
        for mapping in doomed:
            self._remove(mapping)
        return doomed

    def unmap_all(self) -> None:
        """Remove every mapping (client disconnect, DMA_UNMAP with the ALL flag)."""
        for mapping in list(self._mappings):
            self._remove(mapping)

    def _remove(self, mapping: DmaMapping) -> None:
        for listener in self._unmap_listeners:
            _notify(listener, mapping, "unmap")
        where = self._mappings.index(mapping)
        del self._mappings[where]
        del self._starts[where]
        if mapping.memory is not None:
            try:
                mapping.memory.close()
            except BufferError:
                # A memoryview from view() is still alive; the mmap goes when it does.
                logger.warning("dma unmap gpa=%#x: views still exported", mapping.gpa)
            mapping.memory = None
        logger.debug("dma unmap gpa=%#x size=%#x", mapping.gpa, mapping.size)

    def find(self, gpa: int, size: int = 1) -> DmaMapping:
        """The mapping holding all of ``[gpa, gpa+size)``.

        :raises DmaError: no single mapping holds the range.
        """
        where = bisect.bisect_right(self._starts, gpa) - 1
        if where >= 0:
            mapping = self._mappings[where]
            if mapping.contains(gpa, size):
                return mapping
        raise DmaError(f"DMA gpa={gpa:#x} size={size:#x}: not inside one mapping")

    def _memory(self, gpa: int, size: int, write: bool) -> tuple[mmap.mmap, int]:
        mapping = self.find(gpa, size)
        if mapping.memory is None:
            raise DmaError(f"DMA gpa={gpa:#x}: mapping has no fd (use message DMA)")
        if write and not mapping.writable:
            raise DmaError(f"DMA write gpa={gpa:#x}: mapping is read-only")
        if not write and not mapping.readable:
            raise DmaError(f"DMA read gpa={gpa:#x}: mapping is not readable")
        return mapping.memory, gpa - mapping.gpa + mapping.skew

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest memory at ``gpa``.

        :raises DmaError: unmapped, not mmap-able, or not readable.
        """
        memory, offset = self._memory(gpa, size, write=False)
        return memory[offset : offset + size]

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa``.

        :raises DmaError: unmapped, not mmap-able, or read-only.
        """
        memory, offset = self._memory(gpa, len(data), write=True)
        memory[offset : offset + len(data)] = data

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of guest memory; release it before the range is unmapped.

        :raises DmaError: unmapped, not mmap-able, or not readable.
        """
        memory, offset = self._memory(gpa, size, write=False)
        return memoryview(memory)[offset : offset + size]


def _pin_size(mapping: DmaMapping, fd: int) -> None:
    """Make sure the file behind ``fd`` holds the mapped range and can never shrink.

    :raises CommandError: EINVAL when the file is too small, is not a regular
        file, or cannot be sealed against shrinking.
    """
    where = f"DMA_MAP gpa={mapping.gpa:#x} size={mapping.size:#x}"
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise CommandError(errno.EBADF, f"{where}: fstat of the fd failed: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CommandError(errno.EINVAL, f"{where}: the fd is not a regular file or memfd")
    end = mapping.fd_offset + mapping.size
    if end > info.st_size:
        raise CommandError(
            errno.EINVAL,
            f"{where}: the fd holds {info.st_size:#x} bytes, the map needs {end:#x}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        raise CommandError(
            errno.EINVAL,
            f"{where}: the fd can be shrunk under the mapping and cannot be sealed "
            f"against it ({exc}); pass a memfd sealed with F_SEAL_SHRINK, or one created "
            "with MFD_ALLOW_SEALING (QEMU: memory-backend-memfd, seal=on, the default)",
        ) from exc


def _notify(listener: DmaListener, mapping: DmaMapping, what: str) -> None:
    try:
        listener(mapping)
    except Exception:
        logger.exception("dma %s listener failed for gpa=%#x", what, mapping.gpa)
