"""The cpio "newc" (SVR4, no CRC) archive format, as the kernel unpacks an initramfs.

Each member is a 110-byte ASCII header (magic ``070701`` and thirteen 8-digit
hex fields), the NUL-terminated name padded to 4 bytes, then the data padded
to 4 bytes.  The archive ends with a member named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

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


def _header(fields: dict[str, int]) -> bytes:
    return MAGIC + b"".join(b"%08X" % fields[f] for f in HEADER_FIELDS)


def write_newc(entries: Iterable[NewcEntry]) -> bytes:
    """Serialise ``entries`` (parents before children) into a newc archive."""
    out = bytearray()
    members = [*entries, NewcEntry(TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.name.encode() + b"\0"
        is_trailer = entry.name == TRAILER
        fields = {
            "ino": 0 if is_trailer else ino,
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
        out += _header(fields)
        out += name + b"\0" * _pad(HEADER_SIZE + len(name))
        out += entry.data + b"\0" * _pad(len(entry.data))
    return bytes(out)


def read_newc(archive: bytes) -> list[NewcEntry]:
    """Parse a newc archive back into entries (the trailer is not returned).

    Raises NewcError on a bad magic, a truncated member or a missing trailer.
    """
    entries: list[NewcEntry] = []
    pos = 0
    while True:
        header = archive[pos : pos + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise NewcError(f"newc archive truncated at offset {pos}, expected a header")
        if header[: len(MAGIC)] != MAGIC:
            raise NewcError(f"newc magic at offset {pos} is {header[:6]!r}, expected {MAGIC!r}")
        fields = {
            name: int(header[len(MAGIC) + i * FIELD_WIDTH : len(MAGIC) + (i + 1) * FIELD_WIDTH], 16)
            for i, name in enumerate(HEADER_FIELDS)
        }
        pos += HEADER_SIZE
        raw_name = archive[pos : pos + fields["namesize"]]
        if len(raw_name) != fields["namesize"] or not raw_name.endswith(b"\0"):
            raise NewcError(f"newc member name at offset {pos} is truncated or not NUL-terminated")
        name = raw_name[:-1].decode()
        pos += fields["namesize"] + _pad(HEADER_SIZE + fields["namesize"])
        data = archive[pos : pos + fields["filesize"]]
        if len(data) != fields["filesize"]:
            raise NewcError(
                f"newc member {name!r} data truncated, expected {fields['filesize']} bytes"
            )
        pos += fields["filesize"] + _pad(fields["filesize"])
        if name == TRAILER:
            return entries
        entries.append(
            NewcEntry(name, fields["mode"], data, fields["rdevmajor"], fields["rdevminor"],
                      fields["mtime"])
        )
