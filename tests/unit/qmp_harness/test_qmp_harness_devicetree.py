"""The DT patcher: parse QEMU's virt DT, add an arm,smmu-v3 node, write and re-parse."""

from __future__ import annotations

import pytest

from qmp_harness.devicetree import (
    GIC_SPI,
    IRQ_TYPE_LEVEL_HIGH,
    SMMU_COMPATIBLE,
    VIRT_PCIE_NODE,
    DeviceTree,
    DeviceTreeError,
    DtNode,
    IommuMapEntry,
    SmmuV3Node,
    add_smmu_v3,
    dump_machine_dtb,
    parse_dtb,
    pci_rid,
    virt_intx_spi,
    write_dtb,
)
from qmp_harness.fixtures import GuestEnvironment


@pytest.fixture(scope="module")
def virt_tree(guest_env: GuestEnvironment) -> DeviceTree:
    return dump_machine_dtb(guest_env.qemu, guest_env.machine_config())


def test_qemu_dtb_round_trips(virt_tree: DeviceTree) -> None:
    blob = write_dtb(virt_tree)
    again = parse_dtb(blob)
    assert again == virt_tree
    assert write_dtb(again) == blob


def test_smmu_node_and_iommu_map_have_exactly_the_requested_cells(
    virt_tree: DeviceTree,
) -> None:
    before = virt_tree.max_phandle()
    smmu = SmmuV3Node(
        base=0x1000_0000,
        spi=virt_intx_spi(slot=1, pin=1),
        iommu_map=[IommuMapEntry(rid_base=pci_rid(0, 2), sid_base=pci_rid(0, 2), length=8)],
    )
    add_smmu_v3(virt_tree, smmu)
    tree = parse_dtb(write_dtb(virt_tree))
    node = tree.root.find("/smmuv3@10000000")
    assert node.strings("compatible") == [SMMU_COMPATIBLE]
    assert node.cells("reg") == [0, 0x1000_0000, 0, 0x20000]
    assert node.cells("interrupts") == [GIC_SPI, 4, IRQ_TYPE_LEVEL_HIGH]
    assert node.strings("interrupt-names") == ["combined"]
    assert node.cells("#iommu-cells") == [1]
    assert node.properties["dma-coherent"] == b""
    phandle = node.cells("phandle")[0]
    assert phandle == before + 1
    pcie = tree.root.find(VIRT_PCIE_NODE)
    assert pcie.cells("iommu-map") == [0x10, phandle, 0x10, 8]


def test_virt_intx_swizzle() -> None:
    assert [virt_intx_spi(0, p) for p in (1, 2, 3, 4)] == [3, 4, 5, 6]
    assert virt_intx_spi(1, 1) == 4
    assert virt_intx_spi(3, 2) == 3
    with pytest.raises(DeviceTreeError):
        virt_intx_spi(0, 5)


def test_hand_built_tree_and_bad_blobs() -> None:
    root = DtNode("", {"#address-cells": b"\0\0\0\x02"}, [DtNode("child@1", {"x": b"ab"})])
    tree = DeviceTree(root, reservations=[(0x1000, 0x2000)])
    assert parse_dtb(write_dtb(tree)) == tree
    with pytest.raises(DeviceTreeError):
        parse_dtb(b"\0" * 64)
    with pytest.raises(DeviceTreeError):
        root.find("/missing")
