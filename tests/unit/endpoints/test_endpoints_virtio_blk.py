"""virtio-blk over a raw image, driven through its BAR like Linux's virtio_blk.

The expected image contents are computed here from the requests (a
bytearray model of the disk), and the image file is read back with plain
file I/O, never through the device.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.endpoints.test_endpoints_virtio import GuestMemory, LinuxLikeDriver, needs_reset
from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import EndpointSpecError
from vsmmu.endpoints.registry import make_endpoint
from vsmmu.endpoints.virtio_blk import SEG_MAX, SIZE_MAX, VirtioBlk
from vsmmu.endpoints.virtio_pci import DEVICE_CFG_OFFSET, VIRTIO_BAR
from vsmmu.vfio_user import uapi as pci

SECTOR = 512
IMAGE_SECTORS = 64
WRITE = vu.DescFlag.WRITE
NEXT = vu.DescFlag.NEXT
HEADER = 0x20000
STATUS = 0x21000
DATA = 0x30000
IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8
OK, IOERR, UNSUPP = 0, 1, 2
STATUS_UNTOUCHED = 0xEE


def image_bytes(seed: int = 0, sectors: int = IMAGE_SECTORS) -> bytes:
    return bytes((seed + i * 7 + i // SECTOR) % 251 for i in range(sectors * SECTOR))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(image_bytes())
    return path


class BlkDriver(LinuxLikeDriver):
    """Builds virtio-blk requests as chains of (address, length, device-writable)."""

    def submit(self, buffers: list[tuple[int, int, bool]]) -> None:
        for index, (addr, length, writable) in enumerate(buffers):
            last = index == len(buffers) - 1
            flags = (WRITE if writable else 0) | (0 if last else NEXT)
            self.put_descriptor(index, addr, length, flags, index + 1)
        self.make_available(0)
        self.kick()

    def request(self, kind: int, sector: int, data: list[tuple[int, int]] | None = None,
                *, data_writable: bool | None = None) -> int | None:
        """One request (header, data, status); its status byte, None if not completed."""
        self.memory.put("<IIQ", HEADER, kind, 0, sector)
        self.memory.data[STATUS] = STATUS_UNTOUCHED
        writable = kind in (IN, GET_ID) if data_writable is None else data_writable
        before = self.used_idx()
        self.submit([(HEADER, 16, False),
                     *[(addr, length, writable) for addr, length in data or []],
                     (STATUS, 1, True)])
        if self.used_idx() == before:
            return None
        return self.memory.data[STATUS]


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory()


def make_blk(image: Path, memory: GuestMemory, **options: object) -> tuple[VirtioBlk, BlkDriver]:
    device = VirtioBlk("blk-test", path=image, **options)  # type: ignore[arg-type]
    device.bind_dma(memory)
    driver = BlkDriver(device, memory)
    driver.bring_up()
    return device, driver


# -- presentation ----------------------------------------------------------------------


def test_identity_features_and_config(image: Path, memory: GuestMemory) -> None:
    device, driver = make_blk(image, memory)
    config = device.pci.config
    assert config.read_u16(pci.PCI_DEVICE_ID) == 0x1042  # modern virtio-blk (0x1040 + 2)
    assert config.read(pci.PCI_CLASS_PROG, 3) == bytes([0, 0, 1])  # mass storage, SCSI
    features = driver.device_features()
    for bit in (1, 2, 6, 9, 32, 33):  # SIZE_MAX SEG_MAX BLK_SIZE FLUSH VERSION_1 ACCESS_PLATFORM
        assert features >> bit & 1, bit
    assert not features >> 5 & 1  # RO
    bar = device.pci.bars[VIRTIO_BAR]
    raw = b"".join(int(bar.read(DEVICE_CFG_OFFSET + i, 4)).to_bytes(4, "little")
                   for i in range(0, 24, 4))
    capacity, size_max, seg_max, _geometry, blk_size = struct.unpack("<QIIII", raw)
    assert (capacity, blk_size) == (IMAGE_SECTORS, SECTOR)
    assert (size_max, seg_max) == (SIZE_MAX, SEG_MAX)
    assert seg_max + 2 <= device.queues[0].max_size  # a full request fits the ring


def test_readonly_is_advertised(image: Path, memory: GuestMemory) -> None:
    _, driver = make_blk(image, memory, readonly=True)
    assert driver.device_features() >> 5 & 1


# -- data --------------------------------------------------------------------------------


def test_write_then_read_back_moves_data_without_copies(image: Path,
                                                        memory: GuestMemory) -> None:
    device, driver = make_blk(image, memory)
    payload = os.urandom(3 * SECTOR)
    memory.data[DATA : DATA + len(payload)] = payload
    # Data split over two descriptors, the second crossing a page.
    assert driver.request(OUT, 5, [(DATA, SECTOR), (DATA + SECTOR, 2 * SECTOR)]) == OK
    expected = bytearray(image_bytes())
    expected[5 * SECTOR : 8 * SECTOR] = payload
    assert image.read_bytes() == expected

    target = DATA + 0x10000 - SECTOR  # the read crosses a page boundary in guest memory
    copies_before = memory.accesses
    assert driver.request(IN, 4, [(target, 4 * SECTOR)]) == OK
    assert bytes(memory.data[target : target + 4 * SECTOR]) == expected[4 * SECTOR : 8 * SECTOR]
    head, written = driver.used_element(1)
    assert (head, written) == (0, 4 * SECTOR + 1)
    assert memory.view_bytes == 7 * SECTOR  # all data through views
    # The copying accesses of the read are only the ring, the header and the status byte.
    assert memory.accesses - copies_before < 12
    assert device.stats()["sectors_read"] == 4 and device.stats()["sectors_written"] == 3


def test_status_sharing_a_descriptor_with_data_and_a_split_header(image: Path,
                                                                  memory: GuestMemory) -> None:
    _, driver = make_blk(image, memory)
    memory.put("<IIQ", HEADER, IN, 0, 2)
    memory.data[DATA + SECTOR] = STATUS_UNTOUCHED
    driver.submit([(HEADER, 6, False), (HEADER + 6, 10, False), (DATA, SECTOR + 1, True)])
    assert memory.data[DATA + SECTOR] == OK
    assert bytes(memory.data[DATA : DATA + SECTOR]) == image_bytes()[2 * SECTOR : 3 * SECTOR]


def test_last_sector_reads_and_one_past_fails(image: Path, memory: GuestMemory) -> None:
    _, driver = make_blk(image, memory)
    assert driver.request(IN, IMAGE_SECTORS - 1, [(DATA, SECTOR)]) == OK
    assert driver.request(IN, IMAGE_SECTORS - 1, [(DATA, 2 * SECTOR)]) == IOERR
    assert driver.request(IN, IMAGE_SECTORS, [(DATA, SECTOR)]) == IOERR
    assert driver.request(OUT, 2**64 - 1, [(DATA, SECTOR)]) == IOERR
    assert image.read_bytes() == image_bytes()


@pytest.mark.parametrize("kind,sector,data,status", [
    (IN, 0, [(DATA, 100)], IOERR),                   # not whole sectors
    (OUT, 0, [(DATA, SECTOR + 1)], IOERR),
    (0x1234, 0, [], UNSUPP),                          # an unknown type
    (GET_ID, 0, [], IOERR),                           # nowhere to put the id
])
def test_bad_requests_get_an_error_status_and_lose_nothing(
    image: Path, memory: GuestMemory, kind: int, sector: int, data: list[tuple[int, int]],
    status: int,
) -> None:
    device, driver = make_blk(image, memory)
    assert driver.request(kind, sector, data) == status
    assert image.read_bytes() == image_bytes()
    assert not needs_reset(driver)
    # The device goes on: the next good request is served.
    assert driver.request(IN, 1, [(DATA, SECTOR)]) == OK
    assert device.stats()["errors"] == 1


def test_readonly_image_refuses_writes(image: Path, memory: GuestMemory) -> None:
    _, driver = make_blk(image, memory, readonly=True)
    memory.data[DATA : DATA + SECTOR] = b"\xff" * SECTOR
    assert driver.request(OUT, 0, [(DATA, SECTOR)]) == IOERR
    assert driver.request(FLUSH, 0) == OK
    assert driver.request(IN, 0, [(DATA, SECTOR)]) == OK
    assert image.read_bytes() == image_bytes()


def test_get_id_and_flush(image: Path, memory: GuestMemory) -> None:
    device, driver = make_blk(image, memory, serial="disk-0042")
    assert driver.request(GET_ID, 0, [(DATA, 20)]) == OK
    assert bytes(memory.data[DATA : DATA + 20]) == b"disk-0042".ljust(20, b"\0")
    assert driver.request(FLUSH, 0) == OK
    assert device.stats()["flushes"] == 1


def test_segment_limits_are_enforced(image: Path, memory: GuestMemory) -> None:
    _, driver = make_blk(image, memory)
    # One segment larger than size_max (the image is smaller; the limit is checked first).
    assert driver.request(IN, 0, [(DATA, SIZE_MAX + SECTOR)]) == IOERR
    assert bytes(memory.data[DATA : DATA + SECTOR]) == bytes(SECTOR)


def test_refused_dma_leaves_the_request_on_the_ring(image: Path, memory: GuestMemory) -> None:
    device, driver = make_blk(image, memory)
    payload = b"\x5a" * (2 * SECTOR)
    memory.data[DATA : DATA + len(payload)] = payload
    memory.refused.append((DATA + SECTOR, DATA + SECTOR + 1))  # the second sector's page
    assert driver.request(OUT, 0, [(DATA, SECTOR), (DATA + SECTOR, SECTOR)]) is None
    assert image.read_bytes() == image_bytes()  # nothing of the request was written
    assert memory.data[STATUS] == STATUS_UNTOUCHED
    assert device.stats()["dma_faults"] == 1 and not needs_reset(driver)
    memory.refused.clear()
    driver.kick()
    assert driver.used_idx() == 1 and memory.data[STATUS] == OK
    assert image.read_bytes()[: 2 * SECTOR] == payload


def test_a_long_chain_reads_the_descriptor_table_once_per_page(image: Path,
                                                               memory: GuestMemory) -> None:
    """A long request costs one descriptor-table read per DMA page its chain spans, and a
    refused table page stops it on the ring like any refused DMA."""
    device = VirtioBlk("blk-test", path=image)
    device.bind_dma(memory)
    driver = BlkDriver(device, memory)
    driver.enable_bus_master()
    assert driver.negotiate()
    table, size = 0x80800, 256  # 0x80800..0x81800: two pages
    driver.setup_queue(size=size, desc=table)
    driver.set_status(vu.DeviceStatus.DRIVER_OK)
    half = SECTOR // 2  # 128 half-sector segments: the chain's descriptors cross a page
    chain = [(HEADER, 16, False), *[(DATA + i * half, half, False) for i in range(128)],
             (STATUS, 1, True)]
    for index, (addr, length, writable) in enumerate(chain):
        flags = (WRITE if writable else 0) | (NEXT if index < len(chain) - 1 else 0)
        memory.put("<QIHH", table + 16 * index, addr, length, flags, index + 1)
    payload = bytes(range(256)) * (128 * half // 256)
    memory.data[DATA : DATA + len(payload)] = payload
    memory.put("<IIQ", HEADER, OUT, 0, 0)
    memory.data[STATUS] = STATUS_UNTOUCHED
    reads: list[tuple[int, int]] = []
    read = memory.read

    def recording_read(iova: int, length: int) -> bytes:
        reads.append((iova, length))
        return read(iova, length)

    memory.read = recording_read  # type: ignore[method-assign]
    memory.refused.append((0x81000, 0x82000))  # the table's second page
    driver.make_available(0, size)
    driver.kick()
    assert driver.used_idx() == 0 and memory.data[STATUS] == STATUS_UNTOUCHED
    assert image.read_bytes() == image_bytes()
    assert device.stats()["dma_faults"] == 1 and not needs_reset(driver)
    memory.refused.clear()
    reads.clear()
    driver.kick()
    assert driver.used_idx() == 1 and memory.data[STATUS] == OK
    assert image.read_bytes()[: len(payload)] == payload
    table_reads = [(iova, length) for iova, length in reads
                   if iova < table + 16 * size and table < iova + length]
    assert table_reads == [(table, 0x800), (0x81000, 0x800)]


@pytest.mark.parametrize("chain", [
    [(HEADER, 16, False)],                                         # no status byte
    [(HEADER, 16, False), (STATUS, 1, True), (DATA, SECTOR, False)],  # readable after writable
])
def test_malformed_chains_need_reset(image: Path, memory: GuestMemory,
                                     chain: list[tuple[int, int, bool]]) -> None:
    _, driver = make_blk(image, memory)
    memory.put("<IIQ", HEADER, OUT, 0, 0)
    driver.submit(chain)
    assert needs_reset(driver)
    assert image.read_bytes() == image_bytes()


# -- specs -----------------------------------------------------------------------------------


def test_spec_builds_the_device(image: Path) -> None:
    device = make_endpoint(f"virtio-blk,file={image},readonly=on,name=disk0")
    assert isinstance(device, VirtioBlk)
    assert device.readonly and device.name == "disk0" and device.capacity == IMAGE_SECTORS


@pytest.mark.parametrize("options,message", [
    ("", "expected file=PATH"),
    (",file=/nonexistent/disk.raw", "cannot open"),
    (",file={image},color=red", "unknown option"),
    (",file={image},readonly=maybe", "expected on or off"),
    (",file={image},serial=" + "x" * 21, "at most 20"),
])
def test_bad_specs_are_refused_clearly(image: Path, options: str, message: str) -> None:
    with pytest.raises(EndpointSpecError, match=message):
        make_endpoint("virtio-blk" + options.format(image=image))


def test_empty_image_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    with pytest.raises(EndpointSpecError, match="at least one"):
        make_endpoint(f"virtio-blk,file={empty}")


# -- hostile requests ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from([IN, OUT, FLUSH, GET_ID, 2, 0xFFFFFFFF]),
    sector=st.one_of(st.integers(0, IMAGE_SECTORS + 2), st.integers(0, 2**64 - 1)),
    lengths=st.lists(st.integers(0, 3 * SECTOR), max_size=4),
    writable=st.booleans(),
)
def test_any_request_completes_with_a_status_and_only_valid_writes_change_the_image(
    tmp_path: Path, kind: int, sector: int, lengths: list[int], writable: bool,
) -> None:
    path = tmp_path / "fuzz.raw"
    path.write_bytes(image_bytes(3))
    memory = GuestMemory()
    memory.data[DATA : DATA + 0x4000] = bytes(range(256)) * 64
    device, driver = make_blk(path, memory)
    data, addr = [], DATA
    for length in lengths:
        data.append((addr, length))
        addr += length
    status = driver.request(kind, sector, data, data_writable=writable)
    assert status in (OK, IOERR, UNSUPP) and not needs_reset(driver)
    total = sum(lengths)
    model = bytearray(image_bytes(3))
    fits = total % SECTOR == 0 and sector * SECTOR + total <= len(model)
    if kind == OUT and not writable and fits:
        assert status == OK
        model[sector * SECTOR : sector * SECTOR + total] = memory.data[DATA : DATA + total]
    elif kind == IN and writable and fits:
        assert status == OK
        assert memory.data[DATA : DATA + total] == model[sector * SECTOR : sector * SECTOR + total]
    elif kind not in (IN, OUT, FLUSH, GET_ID):
        assert status == UNSUPP
    assert path.read_bytes() == model
    device.close()

