"""Bit-field tables: the one place where architectural fields are shifted and masked.

Every SMMUv3 structure in :mod:`vsmmu.arch` (registers, STE, CD, commands,
events, translation descriptors) is declared as a list of :class:`Field`
objects, written the way Arm IHI 0070 writes them: ``name[msb:lsb]`` in a
64-bit double word ``word`` of the structure.  A :class:`Field` precomputes
its shift and mask, so ``field.get(dword)`` is the fast path the device model
uses in its command loop; :class:`RecordLayout` builds the slower
``decode``/``encode`` of whole records (dicts keyed by field name) on top.

Address fields (``address=True``) are returned *in place*: ``S1ContextPtr``
decodes to the byte address ``dword & GENMASK(51, 6)``, not to the address
shifted down by 6, and encode expects an address aligned the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

DWORD_BYTES = 8
DWORD_MASK = (1 << 64) - 1


class ArchError(ValueError):
    """A value does not fit the architectural field or structure it was given to."""


class Field:
    """One architectural bit field ``name[msb:lsb]`` in double word ``word``."""

    __slots__ = ("address", "inplace_mask", "lsb", "mask", "msb", "name", "width", "word")

    def __init__(self, name: str, msb: int, lsb: int, *, word: int = 0,
                 address: bool = False) -> None:
        if not 0 <= lsb <= msb < 64:
            raise ArchError(f"field {name}: bits [{msb}:{lsb}] not within a 64-bit word")
        self.name = name
        self.msb = msb
        self.lsb = lsb
        self.word = word
        self.width = msb - lsb + 1
        self.mask = (1 << self.width) - 1
        self.inplace_mask = self.mask << lsb
        self.address = address

    def __repr__(self) -> str:
        return f"Field({self.name}[{self.msb}:{self.lsb}] of dword {self.word})"

    def get(self, value: int) -> int:
        """Return this field of ``value`` (an address field stays in place)."""
        if self.address:
            return value & self.inplace_mask
        return (value >> self.lsb) & self.mask

    def test(self, value: int) -> bool:
        """Return whether this field of ``value`` is non-zero."""
        return bool(value & self.inplace_mask)

    def put(self, value: int, field_value: int) -> int:
        """Return ``value`` with this field replaced by ``field_value``.

        Raises :class:`ArchError` if ``field_value`` does not fit the field.
        """
        return (value & ~self.inplace_mask) | self.place(field_value)

    def place(self, field_value: int) -> int:
        """Return ``field_value`` shifted into position (an address is checked, not shifted).

        Raises :class:`ArchError` if ``field_value`` does not fit the field.
        """
        field_value = int(field_value)
        if self.address:
            if field_value & ~self.inplace_mask:
                raise ArchError(
                    f"field {self.name}: address {field_value:#x} has bits outside "
                    f"[{self.msb}:{self.lsb}]")
            return field_value
        if field_value < 0 or field_value > self.mask:
            raise ArchError(
                f"field {self.name}: value {field_value:#x} does not fit {self.width} bits")
        return field_value << self.lsb

    def clamp(self, field_value: int) -> int:
        """Return ``field_value`` truncated to this field (for hostile input, never raises)."""
        if self.address:
            return field_value & self.inplace_mask
        return field_value & self.mask


def words_from_bytes(data: bytes | bytearray | memoryview, count: int) -> list[int]:
    """Split ``data`` into ``count`` little-endian 64-bit double words."""
    if len(data) < count * DWORD_BYTES:
        raise ArchError(f"record of {len(data)} bytes is shorter than {count} double words")
    return [int.from_bytes(data[i * DWORD_BYTES:(i + 1) * DWORD_BYTES], "little")
            for i in range(count)]


def bytes_from_words(words: Iterable[int]) -> bytes:
    """Join 64-bit double words into little-endian bytes."""
    return b"".join((w & DWORD_MASK).to_bytes(DWORD_BYTES, "little") for w in words)


class RecordLayout:
    """A structure of ``size`` bytes described by a list of fields.

    ``decode`` returns every field by name; ``encode`` takes names (missing
    ones are zero) and rejects unknown names and values that do not fit.
    Bits no field names are RES0: ``reserved_mask(word)`` returns them.
    """

    def __init__(self, name: str, size: int, fields: Sequence[Field]) -> None:
        self.name = name
        self.size = size
        self.dwords = max(1, size // DWORD_BYTES)
        self.fields: dict[str, Field] = {}
        for f in fields:
            if f.name in self.fields:
                raise ArchError(f"layout {name}: field {f.name} declared twice")
            if f.word >= self.dwords:
                raise ArchError(f"layout {name}: field {f.name} in dword {f.word} "
                                f"beyond the {self.dwords} of the record")
            self.fields[f.name] = f

    def __repr__(self) -> str:
        return f"RecordLayout({self.name}, {self.size} bytes, {len(self.fields)} fields)"

    def decode_words(self, words: Sequence[int]) -> dict[str, int]:
        """Decode double words into ``{field name: value}``."""
        return {name: f.get(words[f.word]) for name, f in self.fields.items()}

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, int]:
        """Decode little-endian bytes into ``{field name: value}``."""
        return self.decode_words(words_from_bytes(data, self.dwords))

    def encode_words(self, values: Mapping[str, int]) -> list[int]:
        """Encode ``{field name: value}`` into double words."""
        words = [0] * self.dwords
        for name, value in values.items():
            f = self.fields.get(name)
            if f is None:
                raise ArchError(f"layout {self.name}: no field named {name!r}; "
                                f"expected one of {sorted(self.fields)}")
            words[f.word] |= f.place(value)
        return words

    def encode(self, values: Mapping[str, int]) -> bytes:
        """Encode ``{field name: value}`` into little-endian bytes of the record size."""
        return bytes_from_words(self.encode_words(values))[:self.size]

    def reserved_mask(self, word: int) -> int:
        """Return the bits of double word ``word`` that no field names (RES0)."""
        used = 0
        for f in self.fields.values():
            if f.word == word:
                used |= f.inplace_mask
        return DWORD_MASK & ~used
