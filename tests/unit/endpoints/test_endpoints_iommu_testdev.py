"""iommu-testdev driven through its BAR handlers, as QEMU's qtest would drive it.

Guest RAM is a memfd mapped into the function's DMA map table (what QEMU's
vfio-user client maps); the IOMMU is a DmaPort that translates by a fixed
offset and refuses one page, so a test can tell translated from
untranslated accesses.  Expected values come from the register description
in QEMU's docs/specs/iommu-testdev.rst, not from the endpoint.
"""

from __future__ import annotations

import os

import pytest

from vsmmu.endpoints.base import EndpointDmaError, EndpointSpecError
from vsmmu.endpoints.iommu_testdev import IommuTestdev
from vsmmu.endpoints.registry import make_endpoint
from vsmmu.vfio_user import PciDevice
from vsmmu.vfio_user import uapi as pci

RAM = 0x4000_0000
RAM_SIZE = 0x10_0000
#: The test IOMMU maps IOVA x to GPA x + SHIFT.
SHIFT = 0x4000_0000
REFUSED_IOVA = 0x8_0000
PAGE = 0x1000

TRIGGER, GVA_LO, GVA_HI, LEN, RESULT, DBELL, ATTRS, GPA_LO, GPA_HI = range(0, 0x24, 4)
IDLE, BUSY, OK = 0xFFFF_FFFF, 0xFFFF_FFFE, 0
BAD_LEN, TX_FAIL, RD_FAIL, MISMATCH, NOT_ARMED, BAD_ATTRS = range(0xDEAD_0001, 0xDEAD_0007)


class OffsetIommu:
    """A DmaPort: IOVA + SHIFT into the device's own RAM, one page refused."""

    def __init__(self, device: PciDevice) -> None:
        self.device = device
        self.writes: list[tuple[int, bytes]] = []

    def read(self, iova: int, length: int) -> bytes:
        return self.device.dma.read(iova + SHIFT, length)

    def write(self, iova: int, data: bytes) -> None:
        if REFUSED_IOVA <= iova < REFUSED_IOVA + PAGE:
            raise EndpointDmaError(iova, "F_TRANSLATION", length=len(data), write=True)
        self.writes.append((iova, data))
        self.device.dma.write(iova + SHIFT, data)


@pytest.fixture
def testdev() -> IommuTestdev:
    device = make_endpoint("iommu-testdev,name=itd0")
    assert isinstance(device, IommuTestdev) and device.name == "itd0"
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, RAM_SIZE)
    device.pci.dma.map(RAM, RAM_SIZE, pci.DMA_MAP_READ | pci.DMA_MAP_WRITE, memfd, 0)
    device.bind_dma(OffsetIommu(device.pci))
    return device


def writel(device: IommuTestdev, offset: int, value: int) -> None:
    device.pci.bars[0].write(offset, value.to_bytes(4, "little"))


def readl(device: IommuTestdev, offset: int) -> int:
    value = device.pci.bars[0].read(offset, 4)
    assert isinstance(value, int)
    return value


def dma(device: IommuTestdev, iova: int, gpa: int, length: int, attrs: int = 0xA) -> int:
    """The qtest sequence: program, arm, see BUSY, trigger (reads 0), return RESULT."""
    for offset, value in ((GVA_LO, iova & 0xFFFF_FFFF), (GVA_HI, iova >> 32),
                          (GPA_LO, gpa & 0xFFFF_FFFF), (GPA_HI, gpa >> 32),
                          (LEN, length), (ATTRS, attrs), (DBELL, 1)):
        writel(device, offset, value)
    assert readl(device, RESULT) == BUSY
    assert readl(device, TRIGGER) == 0
    return readl(device, RESULT)


def test_identity_and_bar() -> None:
    device = IommuTestdev()
    config = device.pci.config
    assert int.from_bytes(config.read(pci.PCI_VENDOR_ID, 4), "little") == 0x0005_1B36
    assert int.from_bytes(config.read(0x09, 3), "little") == 0xFF_0000
    assert device.pci.region_size(0) == 0x1000


def test_reset_values(testdev: IommuTestdev) -> None:
    assert [readl(testdev, o) for o in (GVA_LO, GVA_HI, LEN, RESULT, ATTRS, GPA_LO, 0x24)] == [
        0, 0, 0, IDLE, 0x2, 0, 0]


def test_translated_write_untranslated_readback(testdev: IommuTestdev) -> None:
    iova = 0x1234
    assert dma(testdev, iova, iova + SHIFT, 10) == OK
    expected = bytes.fromhex("78563412785634127856")
    assert testdev.pci.dma.read(iova + SHIFT, 10) == expected
    assert testdev.pci.dma.read(iova + SHIFT + 10, 2) == b"\0\0"
    # disarmed after the DMA: a second trigger runs nothing
    assert readl(testdev, TRIGGER) == 0 and readl(testdev, RESULT) == NOT_ARMED


def test_gpa_elsewhere_is_a_mismatch(testdev: IommuTestdev) -> None:
    assert dma(testdev, 0x2000, 0x2000 + SHIFT + PAGE, 4) == MISMATCH


def test_refused_write_is_tx_fail_and_nothing_read(testdev: IommuTestdev) -> None:
    assert dma(testdev, REFUSED_IOVA + 8, RAM, 4) == TX_FAIL
    assert testdev.last_dma_fault is not None and testdev.last_dma_fault.write


def test_gpa_outside_ram_is_rd_fail(testdev: IommuTestdev) -> None:
    assert dma(testdev, 0x3000, 0x10, 4) == RD_FAIL


@pytest.mark.parametrize("attrs,result", [(0xA | 1, BAD_ATTRS), (0x8, BAD_ATTRS),
                                          (0x9, OK), (0x0, OK), (0xD, OK)])
def test_attrs_consistency(testdev: IommuTestdev, attrs: int, result: int) -> None:
    assert dma(testdev, 0x5000, 0x5000 + SHIFT, 4, attrs=attrs) == result
    assert bool(testdev.dma.writes) is (result == OK)  # type: ignore[attr-defined]


def test_zero_length_and_disarm(testdev: IommuTestdev) -> None:
    assert dma(testdev, 0x6000, 0x6000 + SHIFT, 0) == BAD_LEN
    writel(testdev, DBELL, 1)
    writel(testdev, DBELL, 0)
    assert readl(testdev, RESULT) == IDLE
    assert readl(testdev, TRIGGER) == 0 and readl(testdev, RESULT) == NOT_ARMED


def test_registers_read_back_and_reset(testdev: IommuTestdev) -> None:
    writel(testdev, GVA_HI, 0xABCD)
    writel(testdev, GVA_LO, 0x1111_2222)
    writel(testdev, GPA_HI, 0x12)
    writel(testdev, RESULT, 0x55)
    assert [readl(testdev, o) for o in (GVA_LO, GVA_HI, GPA_HI, RESULT)] == [
        0x1111_2222, 0xABCD, 0x12, 0x55]
    testdev.pci.reset()
    assert [readl(testdev, o) for o in (GVA_LO, GVA_HI, GPA_HI, RESULT, ATTRS)] == [
        0, 0, 0, IDLE, 0x2]


def test_only_dword_accesses_count(testdev: IommuTestdev) -> None:
    testdev.pci.bars[0].write(LEN, b"\x04\x00")
    testdev.pci.bars[0].write(LEN + 1, b"\x04\x00\x00\x00")
    assert readl(testdev, LEN) == 0
    writel(testdev, LEN, 4)
    assert testdev.pci.bars[0].read(LEN, 2) == 0


def test_unknown_option_is_refused() -> None:
    with pytest.raises(EndpointSpecError, match="unknown option"):
        make_endpoint("iommu-testdev,seed=1")
