"""The cpio "newc" (SVR4, no CRC) archive format, as the kernel unpacks an initramfs.

Each member is a 110-byte ASCII header (magic ``070701`` and thirteen 8-digit
hex fields), the NUL-terminated name padded to 4 bytes, then the data padded
to 4 bytes.  The archive ends with a member named ``TRAILER!!!``.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from construct import Bytes, Const, ConstructError, ExprAdapter, Padding, Struct, this

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)
FIELD_WIDTH = 8
HEADER_SIZE = len(MAGIC) + FIELD_WIDTH * len(HEADER_FIELDS)
ALIGN = 4


class NewcError(ValueError):
    """A newc archive is malformed."""


@dataclass(frozen=True)
class NewcEntry:
    """One archive member: a path (no leading '/'), its mode and its bytes."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    mtime: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> NewcEntry:
        """A directory member."""
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> NewcEntry:
        """A regular file member."""
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> NewcEntry:
        """A symbolic link member; the data is the link target."""
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> NewcEntry:
        """A character device node (e.g. /dev/console, 5:1)."""
        return cls(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad(length: int) -> int:
    return (ALIGN - length % ALIGN) % ALIGN


HEX_FIELD = ExprAdapter(Bytes(FIELD_WIDTH),
                        decoder=lambda raw, _ctx: int(raw, 16),
                        encoder=lambda value, _ctx: b"%08X" % value)
"""An 8-digit ASCII hex number."""
NEWC_HEADER = Struct("magic" / Const(MAGIC), *(name / HEX_FIELD for name in HEADER_FIELDS))
NEWC_MEMBER = Struct(
    "header" / NEWC_HEADER,
    "name" / Bytes(this.header.namesize),
    Padding(lambda ctx: _pad(HEADER_SIZE + ctx.header.namesize)),
    "data" / Bytes(this.header.filesize),
    Padding(lambda ctx: _pad(ctx.header.filesize)),
)
"""One member: header, NUL-terminated name and data, each padded to 4 bytes."""


def write_newc(entries: Iterable[NewcEntry]) -> bytes:
    """Serialise ``entries`` (parents before children) into a newc archive."""
    out = bytearray()
    members = [*entries, NewcEntry(TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.name.encode() + b"\0"
        header = {
            "ino": 0 if entry.name == TRAILER else ino,
            "mode": entry.mode,
            "uid": 0,
            "gid": 0,
            "nlink": 2 if stat.S_ISDIR(entry.mode) else 1,
            "mtime": entry.mtime,
            "filesize": len(entry.data),
            "devmajor": 0,
            "devminor": 0,
            "rdevmajor": entry.rdev_major,
            "rdevminor": entry.rdev_minor,
            "namesize": len(name),
            "check": 0,
        }
        out += NEWC_MEMBER.build({"header": header, "name": name, "data": entry.data})
    return bytes(out)


def read_newc(archive: bytes) -> list[NewcEntry]:
    """Parse a newc archive back into entries (the trailer is not returned).

    Raises NewcError on a bad magic, a truncated member or a missing trailer.
    """
    entries: list[NewcEntry] = []
    stream = io.BytesIO(archive)
    while True:
        pos = stream.tell()
        try:
            member = NEWC_MEMBER.parse_stream(stream)
        except (ConstructError, ValueError) as exc:
            raise NewcError(f"newc member at offset {pos} is malformed or truncated: "
                            f"{exc}") from None
        header = member.header
        if not member.name.endswith(b"\0"):
            raise NewcError(f"newc member name at offset {pos} is not NUL-terminated")
        name = member.name[:-1].decode()
        if name == TRAILER:
            return entries
        entries.append(NewcEntry(name, header.mode, member.data, header.rdevmajor,
                                 header.rdevminor, header.mtime))
