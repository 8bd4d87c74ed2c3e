"""A register space of 32- and 64-bit registers, dispatched through two tables.

:class:`RegisterFile` is the guest-facing half of a device model: aligned 4-
and 8-byte reads and writes, the halves of a 64-bit register, and what
happens on a bad access (RAZ/WI and one log line), declared once.  The model
(:class:`~vsmmu.smmu.SmmuV3`) fills :attr:`RegisterFile._readers` and
:attr:`RegisterFile._writers` with one callable per register offset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vsmmu.arch.registers import REG64, REGISTER_SPACE_SIZE, Reg

WORD_MASK = 0xFFFF_FFFF
WORD_BYTES = 4
DWORD_BYTES = 8


class RegisterFile:
    """Guest accesses to the register space (module docstring); ``name`` labels log lines."""

    def __init__(self, name: str, trace: bool) -> None:
        self.name = name
        self.trace = trace
        # The model's own logger: its trace and its register warnings read as one stream.
        self._log = logging.getLogger(type(self).__module__)
        self._readers: dict[int, Callable[[], int]] = {}
        self._writers: dict[int, Callable[[int], None]] = {}

    def read(self, offset: int, size: int) -> int:
        """Guest register read of ``size`` (4 or 8) bytes at ``offset``; never raises."""
        if not self._access_ok(offset, size, "read"):
            return 0
        if size == DWORD_BYTES and offset in REG64:
            value = self._readers[offset]()
        elif size == DWORD_BYTES:
            value = self._read32(offset) | (self._read32(offset + WORD_BYTES) << 32)
        else:
            value = self._read32(offset)
        if self.trace:
            self._log.info("%s: read  %s/%d = %#x", self.name, reg_name(offset), size, value)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Guest register write of ``size`` (4 or 8) bytes at ``offset``; never raises."""
        if not self._access_ok(offset, size, "write"):
            return
        value &= (1 << (size * 8)) - 1
        if self.trace:
            self._log.info("%s: write %s/%d <- %#x", self.name, reg_name(offset), size, value)
        if size == DWORD_BYTES and offset in REG64:
            self._write_reg(offset, value)
        elif size == DWORD_BYTES:
            self._write32(offset, value & WORD_MASK)
            self._write32(offset + WORD_BYTES, value >> 32)
        else:
            self._write32(offset, value)

    def _access_ok(self, offset: int, size: int, what: str) -> bool:
        if size not in (WORD_BYTES, DWORD_BYTES) or offset % size or offset < 0 \
                or offset + size > REGISTER_SPACE_SIZE:
            self._log.warning("%s: %s of %d bytes at %#x is not an aligned 4/8-byte access "
                           "inside the register space: RAZ/WI", self.name, what, size, offset)
            return False
        return True

    def _read32(self, offset: int) -> int:
        reader = self._readers.get(offset)
        if reader is not None:
            return reader() & WORD_MASK
        high = self._readers.get(offset - WORD_BYTES)
        if high is not None and offset - WORD_BYTES in REG64:
            return high() >> 32
        self._log.warning("%s: read of unknown register offset %#x: RAZ", self.name, offset)
        return 0

    def _write32(self, offset: int, value: int) -> None:
        if offset in REG64:
            old = self._readers[offset]()
            self._write_reg(offset, (old & ~WORD_MASK) | value)
        elif offset - WORD_BYTES in REG64:
            old = self._readers[offset - WORD_BYTES]()
            self._write_reg(offset - WORD_BYTES, (old & WORD_MASK) | (value << 32))
        else:
            self._write_reg(offset, value)

    def _write_reg(self, offset: int, value: int) -> None:
        writer = self._writers.get(offset)
        if writer is None:
            if offset in self._readers:
                self._log.warning("%s: write %#x to %s ignored (read-only or not implemented)",
                               self.name, value, reg_name(offset))
            else:
                self._log.warning("%s: write %#x to unknown register offset %#x ignored",
                               self.name, value, offset)
            return
        writer(value)

    def _attribute_reader(self, attr: str) -> Callable[[], int]:
        def reader() -> int:
            value: int = getattr(self, attr)
            return value
        return reader


def constant(value: int) -> Callable[[], int]:
    """A register reader that always returns ``value``."""
    return lambda: value


def reg_name(offset: int) -> str:
    """The register at ``offset`` by name (``X.hi`` for the top half of a 64-bit one)."""
    try:
        return Reg(offset).name
    except ValueError:
        if offset - WORD_BYTES in REG64:
            return f"{Reg(offset - WORD_BYTES).name}.hi"
        return f"{offset:#x}"
