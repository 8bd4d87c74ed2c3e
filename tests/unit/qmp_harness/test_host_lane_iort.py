"""The IORT upgrade of the host lane, on tables built here byte by byte (IORT E.e layout)."""

from __future__ import annotations

import struct

import pytest

from qmp_harness.host_lane.iort import (
    IortError,
    RootComplexMemoryFlags,
    acpi_checksum_ok,
    find_iort,
    root_complex_flags,
    upgrade_to_canwbs,
)

HEADER = 36  # ACPI table header
NODE_HEADER = 16  # type u8, length u16, revision u8, identifier u32, #mappings u32, offset u32
RC_MEMORY_FLAGS_AT = NODE_HEADER + 7  # CCA u32, hints u8, reserved u16, flags u8


def node(node_type: int, body: bytes) -> bytes:
    return struct.pack("<BHBIII", node_type, NODE_HEADER + len(body), 0, 0, 0, 0) + body


def iort(*nodes: bytes, oem_revision: int = 2) -> bytes:
    body = b"".join(nodes)
    length = HEADER + 12 + len(body)
    table = bytearray(struct.pack("<4sIBB6s8sI4sI", b"IORT", length, 5, 0, b"BOCHS ",
                                  b"BXPC    ", oem_revision, b"BXPC", 1))
    table += struct.pack("<III", len(nodes), HEADER + 12, 0) + body
    table[9] = -sum(table) & 0xFF
    return bytes(table)


ITS = node(0, struct.pack("<II", 1, 0))
ROOT_COMPLEX = node(2, struct.pack("<IBHBIQB3x", 1, 0, 0, 0x3, 0, 0, 0))
SMMU = node(4, bytes(52))


def test_upgrade_sets_canwbs_bumps_the_revision_and_keeps_the_rest() -> None:
    original = iort(ITS, SMMU, ROOT_COMPLEX)
    upgraded = upgrade_to_canwbs(original)
    rc_flags = HEADER + 12 + len(ITS) + len(SMMU) + RC_MEMORY_FLAGS_AT
    assert upgraded[rc_flags] == 0x7
    assert struct.unpack_from("<I", upgraded, 24)[0] == 3
    assert acpi_checksum_ok(upgraded)
    assert len(upgraded) == len(original)
    assert [i for i in range(len(original)) if original[i] != upgraded[i]] == [9, 24, rc_flags]


def test_root_complex_flags_reads_every_root_complex() -> None:
    table = upgrade_to_canwbs(iort(ROOT_COMPLEX, ITS, ROOT_COMPLEX))
    flags = RootComplexMemoryFlags.CPM | RootComplexMemoryFlags.DACS | RootComplexMemoryFlags.CANWBS
    assert root_complex_flags(table) == [flags, flags]


def test_find_iort_skips_other_tables_and_stray_signatures() -> None:
    table = iort(ROOT_COMPLEX)
    blob = b"XSDT" + b"\0" * 40 + b"IORT\xff\xff\xff\xff" + table + b"\0" * 64
    assert find_iort(blob) == table


@pytest.mark.parametrize(("table", "message"), [
    (b"APIC" + iort(ROOT_COMPLEX)[4:], "signature"),
    (iort(ITS, SMMU), "no root complex"),
    (iort(ROOT_COMPLEX)[:-4], "length field"),
])
def test_bad_tables_are_refused(table: bytes, message: str) -> None:
    with pytest.raises(IortError, match=message):
        upgrade_to_canwbs(table)


def test_node_running_past_the_end_is_refused() -> None:
    table = bytearray(iort(ROOT_COMPLEX))
    struct.pack_into("<H", table, HEADER + 12 + 1, 0x400)
    with pytest.raises(IortError, match="length"):
        upgrade_to_canwbs(bytes(table))


def test_no_iort_in_the_blob_is_an_error() -> None:
    with pytest.raises(IortError):
        find_iort(b"\0" * 128)
