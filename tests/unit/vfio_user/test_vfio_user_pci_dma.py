"""Config-space semantics and the DMA map table, without a socket."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.device import IrqVector
from vsmmu.vfio_user.dma import DmaError, DmaMapping, DmaMapTable
from vsmmu.vfio_user.messages import CommandError
from vsmmu.vfio_user.pci import BarLayout, MsixLayout, PciConfigError, PciConfigSpace, PciIdentity

IDENTITY = PciIdentity(vendor_id=0x1B36, device_id=0x10F1, class_code=0x088000)
PAGE = uapi.DEFAULT_PGSIZE
RW = uapi.DMA_MAP_READ | uapi.DMA_MAP_WRITE


def dword(space: PciConfigSpace, offset: int) -> int:
    return int.from_bytes(space.read(offset, 4), "little")


def test_64bit_bar_sizing() -> None:
    size = 1 << 33
    space = PciConfigSpace(IDENTITY, {2: BarLayout(size, is_64bit=True, prefetchable=True)})
    low, high = uapi.PCI_BASE_ADDRESS_0 + 8, uapi.PCI_BASE_ADDRESS_0 + 12
    flags = uapi.PCI_BASE_ADDRESS_MEM_TYPE_64 | uapi.PCI_BASE_ADDRESS_MEM_PREFETCH
    assert dword(space, low) == flags
    space.write(low, b"\xff" * 4)
    space.write(high, b"\xff" * 4)
    assert dword(space, low) == flags  # bits below 8 GiB are size bits
    assert dword(space, high) == (~((size - 1) >> 32)) & 0xFFFF_FFFF
    space.write(low, (0x1000_0000).to_bytes(4, "little"))
    space.write(high, (0x80).to_bytes(4, "little"))
    assert space.bar_address(2) == 0x80_0000_0000
    space.reset()
    assert space.bar_address(2) == 0


def test_status_error_bits_are_write_one_to_clear() -> None:
    space = PciConfigSpace(IDENTITY, {})
    space.write(uapi.PCI_STATUS, (0xFFFF).to_bytes(2, "little"))
    assert space.read_u16(uapi.PCI_STATUS) == uapi.PCI_STATUS_CAP_LIST


def test_capability_chain_with_msix() -> None:
    msix = MsixLayout(vectors=4, bar=0, table_offset=0x2000, pba_offset=0x3000)
    space = PciConfigSpace(IDENTITY, {0: BarLayout(0x4000)}, msix=msix, intx=False)
    found: dict[int, int] = {}
    pointer = space.read(uapi.PCI_CAPABILITY_LIST, 1)[0]
    while pointer:
        cap_id, following = space.read(pointer, 2)
        found[cap_id] = pointer
        pointer = following
    assert set(found) == {uapi.PCI_CAP_ID_EXP, uapi.PCI_CAP_ID_MSIX}
    at = found[uapi.PCI_CAP_ID_MSIX]
    assert space.read_u16(at + uapi.PCI_MSIX_FLAGS) == 3
    assert dword(space, at + uapi.PCI_MSIX_TABLE) == 0x2000
    space.write(at + uapi.PCI_MSIX_FLAGS, (0xFFFF).to_bytes(2, "little"))
    enabled = uapi.PCI_MSIX_FLAGS_ENABLE | uapi.PCI_MSIX_FLAGS_MASKALL | 3
    assert space.read_u16(at + uapi.PCI_MSIX_FLAGS) == enabled
    assert space.read(uapi.PCI_INTERRUPT_PIN, 1) == b"\0"


@pytest.mark.parametrize(
    "bars",
    [
        {0: BarLayout(100)},
        {6: BarLayout(PAGE)},
        {5: BarLayout(PAGE, is_64bit=True)},
        {0: BarLayout(PAGE, is_64bit=True), 1: BarLayout(PAGE)},
    ],
)
def test_impossible_bars_are_rejected(bars: dict[int, BarLayout]) -> None:
    with pytest.raises(PciConfigError, match="BAR"):
        PciConfigSpace(IDENTITY, bars)


def test_dma_unaligned_fd_offset_and_readonly() -> None:
    table = DmaMapTable()
    memfd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 4 * PAGE)
    os.pwrite(memfd, b"abcd", PAGE + 0x10)
    table.map(0x9000, 0x100, uapi.DMA_MAP_READ, memfd, PAGE + 0x10)  # memfd is closed
    with pytest.raises(OSError):
        os.fstat(memfd)
    assert table.read(0x9000, 4) == b"abcd"
    with pytest.raises(DmaError, match="read-only"):
        table.write(0x9000, b"x")
    table.unmap_all()
    with pytest.raises(DmaError):
        table.read(0x9000, 4)


def test_dma_listener_failure_does_not_break_the_table() -> None:
    table = DmaMapTable(max_mappings=2)
    seen: list[DmaMapping] = []

    def broken(mapping: DmaMapping) -> None:
        raise RuntimeError("translator bug")

    table.add_listener(broken, broken)
    table.add_listener(seen.append)
    table.map(0, PAGE, RW, None, 0)
    table.map(PAGE, PAGE, RW, None, 0)
    with pytest.raises(CommandError) as info:
        table.map(4 * PAGE, PAGE, RW, None, 0)
    assert info.value.errno == errno.ENOSPC
    assert [m.gpa for m in seen] == [0, PAGE]
    with pytest.raises(DmaError, match="no fd"):
        table.read(0, 4)
    assert len(table.unmap(0, 2 * PAGE)) == 2


def test_mmap_failure_closes_fd_and_reports_errno() -> None:
    table = DmaMapTable()
    memfd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, PAGE)
    # Write-sealed: a shared writable mapping is refused by mmap itself.
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK)
    with pytest.raises(CommandError) as info:
        table.map(0, PAGE, RW, memfd, 0)
    assert info.value.errno == errno.EPERM  # the mmap errno, passed on
    with pytest.raises(OSError):
        os.fstat(memfd)
    assert len(table) == 0


def test_fd_that_is_not_a_file_is_refused_and_closed() -> None:
    table = DmaMapTable()
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(CommandError) as info:
        table.map(0, PAGE, RW, read, 0)
    assert info.value.errno == errno.EINVAL and "not a regular file" in str(info.value)
    with pytest.raises(OSError):
        os.fstat(read)
    assert len(table) == 0


def test_map_past_the_end_of_the_file_is_refused() -> None:
    table = DmaMapTable()
    memfd = os.memfd_create("small", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, PAGE)
    with pytest.raises(CommandError) as info:
        table.map(0, 2 * PAGE, RW, memfd, 0)
    assert info.value.errno == errno.EINVAL and "holds 0x1000 bytes" in str(info.value)
    assert len(table) == 0


def test_mapped_memfd_cannot_be_shrunk_under_the_service() -> None:
    """Without the seal, ftruncate(0) then a read of the mapping kills the process (SIGBUS)."""
    table = DmaMapTable()
    memfd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 2 * PAGE)
    client_copy = os.dup(memfd)  # the client keeps its own fd to the file
    try:
        table.map(0, 2 * PAGE, RW, memfd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(client_copy, 0)
        assert os.fstat(client_copy).st_size == 2 * PAGE
        assert table.read(PAGE, 4) == bytes(4)
    finally:
        table.unmap_all()
        os.close(client_copy)


def test_unsealable_memfd_is_refused() -> None:
    """A memfd without MFD_ALLOW_SEALING could be shrunk at any time: not mapped."""
    table = DmaMapTable()
    memfd = os.memfd_create("unsealable", os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGE)
    with pytest.raises(CommandError) as info:
        table.map(0, PAGE, RW, memfd, 0)
    assert info.value.errno == errno.EINVAL and "sealed" in str(info.value)
    assert len(table) == 0


def test_edge_trigger_held_while_masked() -> None:
    vector = IrqVector("msix0", automasked=False)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    vector.assign(fd)
    vector.mask()
    assert vector.trigger() is False and vector.pending
    vector.unmask()
    assert os.eventfd_read(fd) == 1
    assert vector.trigger() is True and os.eventfd_read(fd) == 1
    vector.release()
    with pytest.raises(OSError):
        os.fstat(fd)
