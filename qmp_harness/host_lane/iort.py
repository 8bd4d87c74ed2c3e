"""The IORT the host lane boots with: QEMU's own, with its root complexes declared CANWBS.

Linux refuses ``IOMMU_VIOMMU_ALLOC`` on an SMMUv3 unless the SMMU has S2FWB
or the device's root complex is CANWBS (``arm_smmu_get_viommu_size``);
QEMU 11.1.3's SMMUv3 has neither, and only the IORT can say CANWBS.  QEMU's
emulated PCIe models no non-coherent access, so the statement is true of it.
The upgraded table is handed to the kernel through its documented initrd
table upgrade (``CONFIG_ACPI_TABLE_UPGRADE``, ``kernel/firmware/acpi/``),
which takes a table whose OEM revision is higher than the firmware's.

Formats: ACPI 6.5 §5.2.6 (table header, checksum); IORT (Arm DEN 0049E.e)
§3.1 (node header) and §3.1.1.5 (root complex node, memory access flags).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum, IntFlag

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

ACPI_HEADER = Struct(
    "signature" / Bytes(4),
    "length" / Int32ul,
    "revision" / Int8ul,
    "checksum" / Int8ul,
    "oem_id" / Bytes(6),
    "oem_table_id" / Bytes(8),
    "oem_revision" / Int32ul,
    "creator_id" / Bytes(4),
    "creator_revision" / Int32ul,
)
IORT_HEADER = Struct(
    "acpi" / ACPI_HEADER,
    "node_count" / Int32ul,
    "node_offset" / Int32ul,
    "reserved" / Int32ul,
)
IORT_NODE = Struct(
    "type" / Int8ul,
    "length" / Int16ul,
    "revision" / Int8ul,
    "identifier" / Int32ul,
    "id_mapping_count" / Int32ul,
    "id_array_offset" / Int32ul,
)
ROOT_COMPLEX_MEMORY = Struct(
    "cache_coherent" / Int32ul,
    "allocation_hints" / Int8ul,
    "reserved" / Int16ul,
    "memory_access_flags" / Int8ul,
)
"""The memory access properties that open a root complex node's data."""

IORT_SIGNATURE = b"IORT"
TABLE_UPGRADE_PATH = "kernel/firmware/acpi/IORT.aml"
"""Where ``CONFIG_ACPI_TABLE_UPGRADE`` looks in an uncompressed initrd."""
CHECKSUM_OFFSET = 9
BYTE_MASK = 0xFF


class IortNodeType(IntEnum):
    """IORT node types this module reads."""

    ITS_GROUP = 0
    NAMED_COMPONENT = 1
    ROOT_COMPLEX = 2
    SMMU_V1_V2 = 3
    SMMU_V3 = 4


class RootComplexMemoryFlags(IntFlag):
    """Root complex memory access flags (IORT Table 17)."""

    CPM = 0x1
    """Coherent path to memory."""
    DACS = 0x2
    """Device attributes are cacheable and inner shareable."""
    CANWBS = 0x4
    """Coherent accesses are write-back cacheable and shareable."""


class IortError(ValueError):
    """A table is not a well-formed IORT, or no IORT was found."""


def acpi_checksum_ok(table: bytes) -> bool:
    """True when the bytes of ``table`` sum to zero modulo 256 (ACPI's rule)."""
    return sum(table) & BYTE_MASK == 0


def _with_checksum(table: bytearray) -> bytes:
    table[CHECKSUM_OFFSET] = 0
    table[CHECKSUM_OFFSET] = -sum(table) & BYTE_MASK
    return bytes(table)


def find_iort(tables: bytes) -> bytes:
    """The IORT inside QEMU's ``etc/acpi/tables`` blob (a concatenation of tables).

    Its checksum is not checked: the firmware's loader fixes checksums later.
    """
    start = tables.find(IORT_SIGNATURE)
    while start >= 0:
        if start + ACPI_HEADER.sizeof() <= len(tables):
            header = ACPI_HEADER.parse(tables[start:])
            end = start + header.length
            if IORT_HEADER.sizeof() <= header.length and end <= len(tables):
                return tables[start:end]
        start = tables.find(IORT_SIGNATURE, start + 1)
    raise IortError("no IORT in the ACPI tables blob")


def _nodes(table: bytes) -> Iterator[tuple[int, int]]:
    """``(offset, type)`` of every node, checked to lie inside the table."""
    header = IORT_HEADER.parse(table)
    offset = header.node_offset
    for index in range(header.node_count):
        if offset + IORT_NODE.sizeof() > len(table):
            raise IortError(f"IORT node {index} at {offset:#x} runs past the table end")
        node = IORT_NODE.parse(table[offset:])
        if node.length < IORT_NODE.sizeof() or offset + node.length > len(table):
            raise IortError(f"IORT node {index} at {offset:#x} has length {node.length}")
        yield offset, node.type
        offset += node.length


def root_complex_flags(table: bytes) -> list[RootComplexMemoryFlags]:
    """The memory access flags of every root complex node, in table order."""
    flags = []
    for offset, node_type in _nodes(table):
        if node_type == IortNodeType.ROOT_COMPLEX:
            memory = ROOT_COMPLEX_MEMORY.parse(table[offset + IORT_NODE.sizeof():])
            flags.append(RootComplexMemoryFlags(memory.memory_access_flags))
    return flags


def upgrade_to_canwbs(iort: bytes) -> bytes:
    """A copy of ``iort`` whose root complexes are CANWBS, OEM revision + 1, checksum fixed.

    Raises IortError when it is no IORT or has no root complex node.
    """
    if iort[: len(IORT_SIGNATURE)] != IORT_SIGNATURE:
        raise IortError(f"table signature is {iort[:4]!r}, expected {IORT_SIGNATURE!r}")
    header = IORT_HEADER.parse(iort)
    if header.acpi.length != len(iort):
        raise IortError(f"IORT length field {header.acpi.length} != {len(iort)} bytes")
    table = bytearray(iort)
    flags_at = IORT_NODE.sizeof() + ROOT_COMPLEX_MEMORY.sizeof() - 1
    root_complexes = 0
    for offset, node_type in _nodes(iort):
        if node_type == IortNodeType.ROOT_COMPLEX:
            table[offset + flags_at] |= RootComplexMemoryFlags.CANWBS
            root_complexes += 1
    if not root_complexes:
        raise IortError("IORT has no root complex node to declare CANWBS")
    # The kernel only takes an upgrade whose OEM revision is above the firmware's.
    acpi = dict(header.acpi)
    acpi["oem_revision"] += 1
    table[: ACPI_HEADER.sizeof()] = ACPI_HEADER.build(acpi)
    return _with_checksum(table)
