"""The newc writer: archives read back exactly, and the format's framing rules hold."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_images.newc import (
    HEADER_SIZE,
    MAGIC,
    TRAILER,
    NewcEntry,
    NewcError,
    read_newc,
    write_newc,
)


def test_round_trip_of_every_member_kind() -> None:
    entries = [
        NewcEntry.directory("bin"),
        NewcEntry.file("bin/busybox", b"\x7fELF" + bytes(range(256)), 0o755),
        NewcEntry.symlink("bin/sh", "busybox"),
        NewcEntry.char_device("dev/console", 5, 1),
        NewcEntry.file("init", b"#!/bin/sh\n", 0o755),
    ]
    archive = write_newc(entries)
    assert read_newc(archive) == entries
    back = {e.name: e for e in read_newc(archive)}
    assert stat.S_ISCHR(back["dev/console"].mode)
    assert (back["dev/console"].rdev_major, back["dev/console"].rdev_minor) == (5, 1)
    assert stat.S_ISLNK(back["bin/sh"].mode) and back["bin/sh"].data == b"busybox"


def test_members_are_four_byte_aligned_and_trailer_ends_archive() -> None:
    archive = write_newc([NewcEntry.file("a", b"xyz"), NewcEntry.file("bc", b"12345")])
    assert archive.startswith(MAGIC)
    assert len(archive) % 4 == 0
    # the second member's header starts on a 4-byte boundary right after padding
    second = archive.index(MAGIC, HEADER_SIZE)
    assert second % 4 == 0
    assert archive.rstrip(b"\0").endswith(TRAILER.encode())


@settings(deadline=None)  # construct-built archives; a loaded host must not fail it on time
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcdefghij/_-.", min_size=1, max_size=40),
            st.binary(max_size=300),
        ),
        max_size=8,
    )
)
def test_round_trip_property(items: list[tuple[str, bytes]]) -> None:
    entries = [NewcEntry.file(name, data) for name, data in items if name != TRAILER]
    assert read_newc(write_newc(entries)) == entries


def test_truncated_archive_is_rejected() -> None:
    archive = write_newc([NewcEntry.file("init", b"hello world")])
    with pytest.raises(NewcError):
        read_newc(archive[: HEADER_SIZE + 3])
    with pytest.raises(NewcError):
        read_newc(b"070707" + archive[6:])
