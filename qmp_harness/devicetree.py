"""A small flattened-device-tree (DTB) reader/writer and the virt-machine patches we need.

Format (devicetree specification, "Flattened Devicetree Format"): a 40-byte
big-endian header, a memory reservation block of (address, size) u64 pairs
ending in a zero pair, a structure block of 32-bit tokens (BEGIN_NODE name,
PROP len nameoff value, END_NODE, NOP, END) and a strings block of property
names.  We parse into :class:`DtNode` trees and write back version 17.

:func:`dump_machine_dtb` asks QEMU for the DT of a machine configuration;
:func:`add_smmu_v3` adds an ``arm,smmu-v3`` node and an ``iommu-map`` on the
PCIe host bridge, as DESIGN.md section 5 describes.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from construct import ConstructError, GreedyRange, Int32ub, Int64ub, Struct

from qmp_harness.machine import MachineConfig, machine_argv
from qmp_harness.provision import QemuInstall

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMPATIBLE_VERSION = 16
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP_TOKEN = 3
FDT_NOP = 4
FDT_END = 9
FDT_HEADER = Struct(
    "magic" / Int32ub,
    "totalsize" / Int32ub,
    "off_dt_struct" / Int32ub,
    "off_dt_strings" / Int32ub,
    "off_mem_rsvmap" / Int32ub,
    "version" / Int32ub,
    "last_comp_version" / Int32ub,
    "boot_cpuid_phys" / Int32ub,
    "size_dt_strings" / Int32ub,
    "size_dt_struct" / Int32ub,
)
"""``struct fdt_header`` (all fields big-endian)."""
FDT_RESERVE_ENTRY = Struct("address" / Int64ub, "size" / Int64ub)
"""``struct fdt_reserve_entry``; a zero pair ends the block."""
FDT_PROP = Struct("len" / Int32ub, "nameoff" / Int32ub)
"""What follows an FDT_PROP token: the value's length and its name's offset in the strings."""
CELL = Int32ub
"""A 32-bit big-endian cell (tokens, and the values of most properties)."""
CELLS = GreedyRange(CELL)
CELL_SIZE = 4

# include/dt-bindings/interrupt-controller/{arm-gic,irq}.h
GIC_SPI = 0
IRQ_TYPE_LEVEL_HIGH = 4
SMMU_COMPATIBLE = "arm,smmu-v3"
SMMU_REG_SIZE = 0x20000
"""Two 64 KiB register pages."""
VIRT_PCIE_NODE = "pcie@10000000"
VIRT_INTX_FIRST_SPI = 3
"""hw/arm/virt.c: PCIe INTA..INTD of slot 0 are SPIs 3..6, swizzled by slot."""
PCI_INTX_PINS = 4
DUMP_TIMEOUT = 60.0


class DeviceTreeError(ValueError):
    """A DTB is malformed or lacks a node/property a patch needs."""


@dataclass
class DtNode:
    """A device-tree node: name (``unit@addr``), properties in order, children."""

    name: str
    properties: dict[str, bytes] = field(default_factory=dict)
    children: list[DtNode] = field(default_factory=list)

    def child(self, name: str) -> DtNode:
        """The direct child called ``name``; raises DeviceTreeError if absent."""
        for node in self.children:
            if node.name == name:
                return node
        raise DeviceTreeError(f"node {self.name or '/'!r} has no child {name!r}")

    def find(self, path: str) -> DtNode:
        """The node at ``path`` (e.g. ``/pcie@10000000``) below this one."""
        node = self
        for part in filter(None, path.split("/")):
            node = node.child(part)
        return node

    def walk(self) -> Iterator[DtNode]:
        """This node and all its descendants, depth first."""
        yield self
        for node in self.children:
            yield from node.walk()

    def cells(self, prop: str) -> list[int]:
        """Property ``prop`` as a list of u32 cells."""
        raw = self.properties.get(prop)
        if raw is None:
            raise DeviceTreeError(f"node {self.name or '/'!r} has no property {prop!r}")
        if len(raw) % CELL_SIZE:
            raise DeviceTreeError(
                f"property {prop!r} of {self.name!r} is {len(raw)} bytes, expected whole cells"
            )
        return list(CELLS.parse(raw))

    def strings(self, prop: str) -> list[str]:
        """Property ``prop`` as a string list."""
        raw = self.properties.get(prop, b"")
        return [s.decode() for s in raw.split(b"\0")[:-1]]

    def set_cells(self, prop: str, cells: Sequence[int]) -> None:
        """Set ``prop`` to the u32 ``cells``."""
        self.properties[prop] = CELLS.build(list(cells))

    def set_strings(self, prop: str, *values: str) -> None:
        """Set ``prop`` to a string list."""
        self.properties[prop] = b"".join(v.encode() + b"\0" for v in values)


@dataclass
class DeviceTree:
    """A whole DTB: the root node, reservations and the boot CPU id."""

    root: DtNode
    reservations: list[tuple[int, int]] = field(default_factory=list)
    boot_cpuid: int = 0

    def max_phandle(self) -> int:
        """The largest phandle in use (0 if none)."""
        return max(
            (node.cells("phandle")[0] for node in self.root.walk() if "phandle" in node.properties),
            default=0,
        )

    def allocate_phandle(self, node: DtNode) -> int:
        """Give ``node`` a fresh phandle and return it."""
        phandle = self.max_phandle() + 1
        node.set_cells("phandle", [phandle])
        return phandle


def _align(offset: int) -> int:
    return (offset + CELL_SIZE - 1) & ~(CELL_SIZE - 1)


def parse_dtb(blob: bytes) -> DeviceTree:
    """Parse a DTB; raises DeviceTreeError on a bad header or token stream."""
    try:
        return _parse_dtb(blob)
    except (ConstructError, IndexError, ValueError) as exc:
        if isinstance(exc, DeviceTreeError):
            raise
        raise DeviceTreeError(f"DTB is malformed: {exc}") from None


def _parse_dtb(blob: bytes) -> DeviceTree:
    if len(blob) < FDT_HEADER.sizeof():
        raise DeviceTreeError(f"DTB is {len(blob)} bytes, shorter than its header")
    header = FDT_HEADER.parse(blob)
    if header.magic != FDT_MAGIC:
        raise DeviceTreeError(f"DTB magic is {header.magic:#x}, expected {FDT_MAGIC:#x}")
    if header.totalsize > len(blob) or header.version < FDT_LAST_COMPATIBLE_VERSION:
        raise DeviceTreeError(f"DTB totalsize {header.totalsize} / version {header.version} "
                              "not usable")
    strings = blob[header.off_dt_strings : header.off_dt_strings + header.size_dt_strings]
    reservations = []
    pos = header.off_mem_rsvmap
    while True:
        entry = FDT_RESERVE_ENTRY.parse(blob[pos : pos + FDT_RESERVE_ENTRY.sizeof()])
        pos += FDT_RESERVE_ENTRY.sizeof()
        if entry.address == 0 and entry.size == 0:
            break
        reservations.append((entry.address, entry.size))

    pos = header.off_dt_struct
    end = header.off_dt_struct + header.size_dt_struct
    stack: list[DtNode] = []
    root: DtNode | None = None
    while pos < end:
        token = CELL.parse(blob[pos : pos + CELL_SIZE])
        pos += CELL_SIZE
        if token == FDT_BEGIN_NODE:
            nul = blob.index(b"\0", pos)
            node = DtNode(blob[pos:nul].decode())
            pos = _align(nul + 1)
            if stack:
                stack[-1].children.append(node)
            elif root is None:
                root = node
            else:
                raise DeviceTreeError("DTB has more than one root node")
            stack.append(node)
        elif token == FDT_END_NODE:
            if not stack:
                raise DeviceTreeError(f"DTB END_NODE without a node at offset {pos}")
            stack.pop()
        elif token == FDT_PROP_TOKEN:
            prop = FDT_PROP.parse(blob[pos : pos + FDT_PROP.sizeof()])
            pos += FDT_PROP.sizeof()
            name = strings[prop.nameoff : strings.index(b"\0", prop.nameoff)].decode()
            if not stack:
                raise DeviceTreeError(f"DTB property {name!r} outside any node")
            stack[-1].properties[name] = bytes(blob[pos : pos + prop.len])
            pos = _align(pos + prop.len)
        elif token == FDT_NOP:
            continue
        elif token == FDT_END:
            break
        else:
            raise DeviceTreeError(f"DTB token {token:#x} at offset {pos - CELL_SIZE} is unknown")
    if root is None or stack:
        raise DeviceTreeError("DTB structure block is empty or unbalanced")
    return DeviceTree(root, reservations, header.boot_cpuid_phys)


def write_dtb(tree: DeviceTree) -> bytes:
    """Serialise ``tree`` as a version-17 DTB."""
    strings = bytearray()
    offsets: dict[str, int] = {}
    structure = bytearray()

    def name_offset(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    def emit(node: DtNode) -> None:
        structure.extend(CELL.build(FDT_BEGIN_NODE))
        raw = node.name.encode() + b"\0"
        structure.extend(raw + b"\0" * (_align(len(raw)) - len(raw)))
        for prop, value in node.properties.items():
            structure.extend(CELL.build(FDT_PROP_TOKEN))
            structure.extend(FDT_PROP.build({"len": len(value), "nameoff": name_offset(prop)}))
            structure.extend(value + b"\0" * (_align(len(value)) - len(value)))
        for child in node.children:
            emit(child)
        structure.extend(CELL.build(FDT_END_NODE))

    emit(tree.root)
    structure.extend(CELL.build(FDT_END))
    reserve = b"".join(FDT_RESERVE_ENTRY.build({"address": a, "size": s})
                       for a, s in [*tree.reservations, (0, 0)])
    off_rsv = _align(FDT_HEADER.sizeof())
    off_struct = off_rsv + len(reserve)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings)
    header: bytes = FDT_HEADER.build({
        "magic": FDT_MAGIC, "totalsize": total, "off_dt_struct": off_struct,
        "off_dt_strings": off_strings, "off_mem_rsvmap": off_rsv, "version": FDT_VERSION,
        "last_comp_version": FDT_LAST_COMPATIBLE_VERSION, "boot_cpuid_phys": tree.boot_cpuid,
        "size_dt_strings": len(strings), "size_dt_struct": len(structure),
    })
    return (header + b"\0" * (off_rsv - len(header)) + reserve + bytes(structure)
            + bytes(strings))


def dump_machine_dtb(install: QemuInstall, config: MachineConfig) -> DeviceTree:
    """Ask QEMU for the DT it would generate for ``config`` (``-machine dumpdtb=``).

    Devices and a custom dtb are left out: PCI functions do not appear in
    the virt DT and a dump must describe QEMU's own tree.
    Raises DeviceTreeError if QEMU fails.
    """
    with tempfile.TemporaryDirectory(prefix="vsmmu-dtb-") as tmp:
        out = Path(tmp) / "virt.dtb"
        dump_config = replace(
            config, dtb=None, devices=(),
            machine_options=[*config.machine_options, f"dumpdtb={out}"],
        )
        argv = machine_argv(install, dump_config, qmp_socket=None, console_socket=None,
                            paused=False)
        proc = subprocess.run(argv, env=install.env(), capture_output=True, text=True,
                              timeout=DUMP_TIMEOUT)
        if not out.exists():
            raise DeviceTreeError(
                f"QEMU dumpdtb wrote no file (status {proc.returncode}): {proc.stderr.strip()}"
            )
        return parse_dtb(out.read_bytes())


@dataclass(frozen=True)
class IommuMapEntry:
    """One ``iommu-map`` entry: ``length`` RIDs from ``rid_base`` map to ``sid_base``+."""

    rid_base: int
    sid_base: int
    length: int = 1


@dataclass(frozen=True)
class SmmuV3Node:
    """Where the SMMU lives and how it signals: what :func:`add_smmu_v3` writes."""

    base: int
    spi: int
    """The GIC SPI number (``interrupts = <GIC_SPI spi IRQ_TYPE_LEVEL_HIGH>``)."""
    size: int = SMMU_REG_SIZE
    iommu_map: Sequence[IommuMapEntry] = ()
    pcie_node: str = VIRT_PCIE_NODE


def virt_intx_spi(slot: int, pin: int) -> int:
    """The GIC SPI carrying INTx ``pin`` (1=INTA..4=INTD) of PCI ``slot`` on virt."""
    if not 1 <= pin <= PCI_INTX_PINS:
        raise DeviceTreeError(f"PCI interrupt pin {pin} is not 1..{PCI_INTX_PINS}")
    return VIRT_INTX_FIRST_SPI + (slot + pin - 1) % PCI_INTX_PINS


def pci_rid(bus: int, slot: int, function: int = 0) -> int:
    """The PCI requester ID (bus << 8 | devfn) of a function."""
    return (bus << 8) | (slot << 3) | function


def _split_cells(value: int, count: int) -> list[int]:
    return [(value >> (32 * (count - 1 - i))) & 0xFFFFFFFF for i in range(count)]


def add_smmu_v3(tree: DeviceTree, smmu: SmmuV3Node) -> DtNode:
    """Add an ``arm,smmu-v3`` node under ``/`` and an ``iommu-map`` on the PCIe node.

    Returns the new node.  An existing ``iommu-map`` on the PCIe node is
    replaced; with an empty ``iommu_map`` none is written.
    Raises DeviceTreeError if the PCIe node does not exist.
    """
    root = tree.root
    address_cells = root.cells("#address-cells")[0] if "#address-cells" in root.properties else 2
    size_cells = root.cells("#size-cells")[0] if "#size-cells" in root.properties else 1
    pcie = root.find(smmu.pcie_node)
    node = DtNode(f"smmuv3@{smmu.base:x}")
    node.set_strings("compatible", SMMU_COMPATIBLE)
    node.set_cells("reg", [*_split_cells(smmu.base, address_cells),
                           *_split_cells(smmu.size, size_cells)])
    node.set_cells("interrupts", [GIC_SPI, smmu.spi, IRQ_TYPE_LEVEL_HIGH])
    node.set_strings("interrupt-names", "combined")
    node.set_cells("#iommu-cells", [1])
    node.properties["dma-coherent"] = b""
    phandle = tree.allocate_phandle(node)
    root.children.append(node)
    if smmu.iommu_map:
        pcie.set_cells(
            "iommu-map",
            [c for e in smmu.iommu_map for c in (e.rid_base, phandle, e.sid_base, e.length)],
        )
    else:
        pcie.properties.pop("iommu-map", None)
    return node


