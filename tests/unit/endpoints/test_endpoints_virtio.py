"""The virtio-pci transport and virtio-rng, driven through the handlers vfio-user would call.

A Linux-like driver reaches the device only through its BAR and config
space; rings and buffers live in :class:`GuestMemory`, which the endpoint
reaches only through its DMA port.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmp_harness.hwrng import locate_in_stream, match_stream_blocks
from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import Endpoint, EndpointDmaError, EndpointSpecError
from vsmmu.endpoints.registry import make_endpoint
from vsmmu.endpoints.virtio_pci import (
    COMMON_CFG_OFFSET,
    DEFAULT_QUEUE_MAX_SIZE,
    ISR_OFFSET,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET,
    VIRTIO_BAR,
    VirtioPciEndpoint,
)
from vsmmu.endpoints.virtio_rng import MAX_REQUEST_BYTES, VirtioRng, expected_stream
from vsmmu.vfio_user import uapi as pci

MEMORY_SIZE = 1 << 20
DESC_TABLE = 0x1000
AVAIL_RING = 0x2000
USED_RING = 0x3000
BUFFERS = 0x10000
QUEUE_SIZE = 8
PAGE_SIZE = 4096
WIDTH = vu.COMMON_CFG_WIDTH


class GuestMemory:
    """Flat guest memory at IOVA 0 with optional refused ranges (a DmaPort)."""

    def __init__(self, size: int = MEMORY_SIZE) -> None:
        self.data = bytearray(size)
        self.refused: list[tuple[int, int]] = []
        self.accesses = 0
        self.view_bytes = 0

    def _check(self, iova: int, length: int, write: bool) -> None:
        self.accesses += 1
        for start, end in self.refused:
            if iova < end and start < iova + length:
                raise EndpointDmaError(iova, "refused by the test", length=length, write=write)
        if iova + length > len(self.data):
            raise EndpointDmaError(iova, "outside guest memory", length=length, write=write)

    def read(self, iova: int, length: int) -> bytes:
        """DmaPort read."""
        self._check(iova, length, write=False)
        return bytes(self.data[iova : iova + length])

    def write(self, iova: int, data: bytes) -> None:
        """DmaPort write."""
        self._check(iova, len(data), write=True)
        self.data[iova : iova + len(data)] = data

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """DmaPort views: one per 4 KiB page touched, as the translating port returns."""
        self._check(iova, length, write=write)
        self.view_bytes += length
        views = []
        while length > 0:
            chunk = min(length, PAGE_SIZE - iova % PAGE_SIZE)
            views.append(memoryview(self.data)[iova : iova + chunk])
            iova += chunk
            length -= chunk
        return views

    def u16(self, address: int) -> int:
        """A little-endian u16 of guest memory (the driver's view)."""
        return int(struct.unpack_from("<H", self.data, address)[0])

    def put(self, fmt: str, address: int, *values: int) -> None:
        """Store values as the driver would."""
        struct.pack_into(fmt, self.data, address, *values)


class LinuxLikeDriver:
    """Drives a :class:`VirtioPciEndpoint` the way Linux's virtio_pci_modern does."""

    def __init__(self, device: VirtioPciEndpoint, memory: GuestMemory) -> None:
        self.device = device
        self.memory = memory
        self.bar = device.pci.bars[VIRTIO_BAR]
        self.avail_idx = 0
        self.used_seen = 0

    # -- registers ---------------------------------------------------------

    def read(self, register: vu.CommonCfg) -> int:
        value = self.bar.read(COMMON_CFG_OFFSET + register, WIDTH[register])
        assert isinstance(value, int)
        return value

    def write(self, register: vu.CommonCfg, value: int) -> None:
        width = WIDTH[register]
        self.bar.write(COMMON_CFG_OFFSET + register, value.to_bytes(width, "little"))

    def status(self) -> vu.DeviceStatus:
        return vu.DeviceStatus(self.read(vu.CommonCfg.DEVICE_STATUS))

    def set_status(self, bits: vu.DeviceStatus) -> None:
        self.write(vu.CommonCfg.DEVICE_STATUS, int(self.status() | bits))

    def read_isr(self) -> int:
        value = self.bar.read(ISR_OFFSET, 1)
        assert isinstance(value, int)
        return value

    def device_features(self) -> int:
        features = 0
        for select in (0, 1):
            self.write(vu.CommonCfg.DEVICE_FEATURE_SELECT, select)
            features |= self.read(vu.CommonCfg.DEVICE_FEATURE) << (32 * select)
        return features

    def write_driver_features(self, features: int) -> None:
        for select in (0, 1):
            self.write(vu.CommonCfg.DRIVER_FEATURE_SELECT, select)
            self.write(vu.CommonCfg.DRIVER_FEATURE, (features >> (32 * select)) & 0xFFFF_FFFF)

    def enable_bus_master(self) -> None:
        command = pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER
        self.device.pci.config.write(pci.PCI_COMMAND, command.to_bytes(2, "little"))

    # -- the probe sequence -----------------------------------------------------

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACK, DRIVER, features, FEATURES_OK; True when FEATURES_OK stuck."""
        self.write(vu.CommonCfg.DEVICE_STATUS, 0)
        self.set_status(vu.DeviceStatus.ACKNOWLEDGE)
        self.set_status(vu.DeviceStatus.DRIVER)
        offered = self.device_features()
        self.write_driver_features(offered if features is None else features)
        self.set_status(vu.DeviceStatus.FEATURES_OK)
        return bool(self.status() & vu.DeviceStatus.FEATURES_OK)

    def setup_queue(
        self,
        size: int = QUEUE_SIZE,
        desc: int = DESC_TABLE,
        driver: int = AVAIL_RING,
        device: int = USED_RING,
    ) -> None:
        self.write(vu.CommonCfg.QUEUE_SELECT, 0)
        self.write(vu.CommonCfg.QUEUE_SIZE, size)
        for low, value in (
            (vu.CommonCfg.QUEUE_DESC_LO, desc),
            (vu.CommonCfg.QUEUE_DRIVER_LO, driver),
            (vu.CommonCfg.QUEUE_DEVICE_LO, device),
        ):
            # Linux writes 64-bit addresses as two 32-bit halves.
            self.write(low, value & 0xFFFF_FFFF)
            self.write(vu.CommonCfg(low + 4), value >> 32)
        self.write(vu.CommonCfg.QUEUE_ENABLE, 1)

    def bring_up(self) -> None:
        self.enable_bus_master()
        assert self.negotiate()
        self.setup_queue()
        self.set_status(vu.DeviceStatus.DRIVER_OK)

    # -- requests ------------------------------------------------------------------

    def put_descriptor(
        self, index: int, addr: int, length: int, flags: int, following: int = 0
    ) -> None:
        self.memory.put(
            "<QIHH", DESC_TABLE + vu.VIRTQ_DESC_SIZE * index, addr, length, flags, following
        )

    def make_available(self, head: int, size: int = QUEUE_SIZE) -> None:
        slot = self.avail_idx % size
        self.memory.put("<H", AVAIL_RING + vu.VIRTQ_AVAIL_RING + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) % vu.VIRTQ_IDX_MODULUS
        self.memory.put("<H", AVAIL_RING + vu.VIRTQ_AVAIL_IDX, self.avail_idx)

    def kick(self, queue: int = 0) -> None:
        self.bar.write(NOTIFY_OFFSET + NOTIFY_MULTIPLIER * queue, queue.to_bytes(2, "little"))

    def used_idx(self) -> int:
        return self.memory.u16(USED_RING + vu.VIRTQ_USED_IDX)

    def used_element(self, slot: int) -> tuple[int, int]:
        address = USED_RING + vu.VIRTQ_USED_RING + vu.VIRTQ_USED_ELEM_SIZE * slot
        head, length = struct.unpack_from("<II", self.memory.data, address)
        return int(head), int(length)


# -- fixtures ------------------------------------------------------------------------

SEED = 42
WRITE = vu.DescFlag.WRITE
NEXT = vu.DescFlag.NEXT


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory()


@pytest.fixture
def rng(memory: GuestMemory) -> VirtioRng:
    device = VirtioRng("rng-test", seed=SEED)
    device.bind_dma(memory)
    return device


@pytest.fixture
def driver(rng: VirtioRng, memory: GuestMemory) -> LinuxLikeDriver:
    return LinuxLikeDriver(rng, memory)


@pytest.fixture
def live(driver: LinuxLikeDriver) -> LinuxLikeDriver:
    driver.bring_up()
    return driver


def needs_reset(driver: LinuxLikeDriver) -> bool:
    return bool(driver.status() & vu.DeviceStatus.DEVICE_NEEDS_RESET)


# -- PCI presentation ----------------------------------------------------------------


def std_capabilities(device: VirtioRng) -> list[tuple[int, bytes]]:
    config = device.pci.config
    found = []
    offset = config.read(pci.PCI_CAPABILITY_LIST, 1)[0]
    while offset:
        cap_id = config.read(offset, 1)[0]
        length = config.read(offset + vu.VIRTIO_PCI_CAP_LEN, 1)[0]
        found.append((cap_id, config.read(offset, length if cap_id == pci.PCI_CAP_ID_VNDR else 2)))
        offset = config.read(offset + pci.PCI_CAP_LIST_NEXT, 1)[0]
    return found


def test_modern_virtio_identity_and_capabilities(rng: VirtioRng) -> None:
    config = rng.pci.config
    assert config.read_u16(pci.PCI_VENDOR_ID) == vu.VIRTIO_PCI_VENDOR_ID
    device_id = vu.VIRTIO_PCI_MODERN_DEVICE_BASE + vu.VirtioDeviceId.ENTROPY
    assert config.read_u16(pci.PCI_DEVICE_ID) == device_id
    assert config.read(pci.PCI_REVISION_ID, 1)[0] >= vu.VIRTIO_PCI_MODERN_REVISION
    assert config.read(pci.PCI_INTERRUPT_PIN, 1)[0] == pci.PCI_INTERRUPT_PIN_INTA
    caps = std_capabilities(rng)
    assert pci.PCI_CAP_ID_MSIX not in [cap_id for cap_id, _ in caps]
    virtio = {
        body[vu.VIRTIO_PCI_CAP_CFG_TYPE]: body
        for cap_id, body in caps
        if cap_id == pci.PCI_CAP_ID_VNDR
    }
    assert set(virtio) == {
        vu.VirtioPciCapType.COMMON_CFG,
        vu.VirtioPciCapType.NOTIFY_CFG,
        vu.VirtioPciCapType.ISR_CFG,
        vu.VirtioPciCapType.DEVICE_CFG,
    }
    for body in virtio.values():
        bar = body[vu.VIRTIO_PCI_CAP_BAR]
        offset, length = struct.unpack_from("<II", body, vu.VIRTIO_PCI_CAP_OFFSET)
        assert bar == VIRTIO_BAR and length > 0
        assert offset + length <= rng.pci.bars[bar].size
    notify = virtio[vu.VirtioPciCapType.NOTIFY_CFG]
    assert len(notify) == vu.VIRTIO_PCI_NOTIFY_CAP_SIZEOF
    assert struct.unpack_from("<I", notify, vu.VIRTIO_PCI_NOTIFY_CAP_MULT)[0] == NOTIFY_MULTIPLIER
    common = virtio[vu.VirtioPciCapType.COMMON_CFG]
    assert struct.unpack_from("<I", common, vu.VIRTIO_PCI_CAP_OFFSET)[0] == COMMON_CFG_OFFSET
    # No extended capabilities unless ATS is asked for.
    assert config.read(pci.PCI_EXT_CAP_FIRST, 4) == bytes(4)


def test_ats_option_exposes_the_extended_capability() -> None:
    device = make_endpoint("virtio-rng,seed=7,ats=on,name=rng9")
    assert isinstance(device, VirtioRng) and device.seed == 7 and device.name == "rng9"
    header = int.from_bytes(device.pci.config.read(pci.PCI_EXT_CAP_FIRST, 4), "little")
    assert header & ((1 << pci.PCI_EXT_CAP_VER_SHIFT) - 1) == pci.PCI_EXT_CAP_ID_ATS
    ctrl = pci.PCI_EXT_CAP_FIRST + pci.PCI_ATS_CTRL
    device.pci.config.write(ctrl, pci.PCI_ATS_CTRL_ENABLE.to_bytes(2, "little"))
    assert device.pci.config.read_u16(ctrl) == pci.PCI_ATS_CTRL_ENABLE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("virtio-net", "kind 'virtio-net'"),
        ("", "expected 'kind"),
        ("virtio-rng,seed", "not key=value"),
        ("virtio-rng,seed=1,seed=2", "given twice"),
        ("virtio-rng,seed=-1", "expected 0 <= seed"),
        ("virtio-rng,seed=x", "expected an integer"),
        ("virtio-rng,ats=maybe", "expected on or off"),
        ("virtio-rng,colour=red", "unknown option"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(EndpointSpecError, match=message):
        make_endpoint(spec)


def test_make_endpoint_defaults_keep_the_contract() -> None:
    device = make_endpoint("virtio-rng")
    assert isinstance(device, Endpoint) and device.name == "virtio-rng0"
    assert device.pci.region_size(VIRTIO_BAR) == device.pci.bars[VIRTIO_BAR].size


# -- feature negotiation and status --------------------------------------------------------


def test_offers_version_1_and_access_platform(driver: LinuxLikeDriver) -> None:
    offered = driver.device_features()
    assert offered >> vu.VirtioFeature.VERSION_1 & 1
    assert offered >> vu.VirtioFeature.ACCESS_PLATFORM & 1
    assert not offered >> vu.VirtioFeature.RING_INDIRECT_DESC & 1


def test_features_ok_sticks_only_for_an_acceptable_subset(driver: LinuxLikeDriver) -> None:
    offered = driver.device_features()
    assert not driver.negotiate(offered | 1 << vu.VirtioFeature.RING_EVENT_IDX)
    assert not driver.negotiate(offered & ~(1 << vu.VirtioFeature.VERSION_1))
    assert driver.negotiate(offered)
    assert driver.device.feature_negotiated(vu.VirtioFeature.ACCESS_PLATFORM)
    # Features are frozen once FEATURES_OK stuck.
    driver.write_driver_features(1 << vu.VirtioFeature.VERSION_1)
    assert driver.device.feature_negotiated(vu.VirtioFeature.ACCESS_PLATFORM)


def test_status_zero_resets_transport_but_not_the_stream(live: LinuxLikeDriver) -> None:
    rng = live.device
    assert isinstance(rng, VirtioRng)
    live.put_descriptor(0, BUFFERS, 64, WRITE)
    live.make_available(0)
    live.kick()
    assert rng.position == 64
    live.write(vu.CommonCfg.DEVICE_STATUS, 0)
    assert live.status() == 0
    assert live.read(vu.CommonCfg.QUEUE_ENABLE) == 0
    assert live.read(vu.CommonCfg.QUEUE_SIZE) == DEFAULT_QUEUE_MAX_SIZE
    assert live.read(vu.CommonCfg.QUEUE_DESC_LO) == 0
    assert not rng.feature_negotiated(vu.VirtioFeature.VERSION_1)
    assert rng.position == 64
    rng.reset()
    assert rng.position == 0


def test_function_reset_from_vfio_user_resets_the_device(live: LinuxLikeDriver) -> None:
    live.put_descriptor(0, BUFFERS, 32, WRITE)
    live.make_available(0)
    live.kick()
    live.device.pci.reset()  # what DEVICE_RESET from QEMU runs
    assert live.status() == 0 and isinstance(live.device, VirtioRng)
    assert live.device.position == 0
    assert not live.device.pci.intx.asserted


def test_no_msix_vectors(live: LinuxLikeDriver) -> None:
    live.write(vu.CommonCfg.CONFIG_MSIX_VECTOR, 0)
    live.write(vu.CommonCfg.QUEUE_MSIX_VECTOR, 0)
    assert live.read(vu.CommonCfg.CONFIG_MSIX_VECTOR) == vu.VIRTIO_MSI_NO_VECTOR
    assert live.read(vu.CommonCfg.QUEUE_MSIX_VECTOR) == vu.VIRTIO_MSI_NO_VECTOR
    assert live.read(vu.CommonCfg.NUM_QUEUES) == 1
    live.write(vu.CommonCfg.QUEUE_SELECT, 5)
    assert live.read(vu.CommonCfg.QUEUE_SIZE) == 0


# -- requests ----------------------------------------------------------------------------


def test_request_is_filled_with_the_stream_and_used_ring_updated(live: LinuxLikeDriver) -> None:
    rng = live.device
    intx = rng.pci.intx
    live.put_descriptor(3, BUFFERS, 100, WRITE | NEXT, following=5)
    live.put_descriptor(5, BUFFERS + 0x1000, 60, WRITE)
    live.make_available(3)
    live.kick()
    stream = expected_stream(SEED, 0, 160)
    assert live.memory.data[BUFFERS : BUFFERS + 100] == stream[:100]
    assert live.memory.data[BUFFERS + 0x1000 : BUFFERS + 0x1000 + 60] == stream[100:]
    assert live.used_idx() == 1
    assert live.used_element(0) == (3, 160)
    # INTx: asserted by the completion, dropped by the ISR read, which clears.
    assert intx.asserted
    assert live.read_isr() == vu.IsrStatus.QUEUE
    assert not intx.asserted
    assert live.read_isr() == 0
    # The next request continues the stream.
    live.put_descriptor(0, BUFFERS, 16, WRITE)
    live.make_available(0)
    live.kick()
    assert live.memory.data[BUFFERS : BUFFERS + 16] == expected_stream(SEED, 160, 16)
    assert live.used_element(1) == (0, 16)


def test_many_requests_wrap_the_rings(live: LinuxLikeDriver) -> None:
    for round_ in range(3 * QUEUE_SIZE):
        live.put_descriptor(round_ % QUEUE_SIZE, BUFFERS, 8, WRITE)
        live.make_available(round_ % QUEUE_SIZE)
        # One doorbell serves at most one queue's worth.
        if round_ % QUEUE_SIZE == QUEUE_SIZE - 1:
            live.kick()
    assert live.used_idx() == 3 * QUEUE_SIZE
    assert live.device.requests_completed == 3 * QUEUE_SIZE


def test_device_readable_descriptors_are_not_written(live: LinuxLikeDriver) -> None:
    live.memory.data[BUFFERS : BUFFERS + 8] = b"readonly"
    live.put_descriptor(0, BUFFERS, 8, NEXT, following=1)
    live.put_descriptor(1, BUFFERS + 8, 8, WRITE)
    live.make_available(0)
    live.kick()
    assert live.memory.data[BUFFERS : BUFFERS + 8] == b"readonly"
    assert live.used_element(0) == (0, 8)


def test_notify_ignored_before_driver_ok_and_without_bus_master(driver: LinuxLikeDriver) -> None:
    assert driver.negotiate()
    driver.setup_queue()
    driver.put_descriptor(0, BUFFERS, 8, WRITE)
    driver.make_available(0)
    driver.kick()  # no DRIVER_OK
    assert driver.used_idx() == 0
    driver.set_status(vu.DeviceStatus.DRIVER_OK)
    driver.kick()  # bus mastering still off
    assert driver.used_idx() == 0
    driver.enable_bus_master()
    driver.kick()
    assert driver.used_idx() == 1


def test_suppressed_interrupts_are_not_raised(live: LinuxLikeDriver) -> None:
    live.memory.put("<H", AVAIL_RING + vu.VIRTQ_AVAIL_FLAGS, vu.AvailFlag.NO_INTERRUPT)
    live.put_descriptor(0, BUFFERS, 8, WRITE)
    live.make_available(0)
    live.kick()
    assert live.used_idx() == 1
    assert not live.device.pci.intx.asserted


# -- hostile rings ---------------------------------------------------------------------


def assert_stopped_with_needs_reset(live: LinuxLikeDriver, reason: str) -> None:
    assert needs_reset(live)
    assert reason in (live.device.needs_reset_reason or "")
    assert live.used_idx() == 0
    assert live.device.pci.intx.asserted
    assert live.read_isr() & vu.IsrStatus.CONFIG
    # Nothing more is processed until a reset, after which the device works.
    live.kick()
    assert live.used_idx() == 0
    live.bring_up()
    live.avail_idx = 0
    live.memory.put("<H", AVAIL_RING + vu.VIRTQ_AVAIL_IDX, 0)
    live.put_descriptor(0, BUFFERS, 8, WRITE)
    live.make_available(0)
    live.kick()
    assert live.used_idx() == 1 and not needs_reset(live)


def test_descriptor_loop_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.put_descriptor(0, BUFFERS, 8, WRITE | NEXT, following=1)
    live.put_descriptor(1, BUFFERS, 8, WRITE | NEXT, following=0)
    live.make_available(0)
    live.kick()
    assert_stopped_with_needs_reset(live, "a loop")


def test_head_index_out_of_range_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.make_available(QUEUE_SIZE + 100)
    live.kick()
    assert_stopped_with_needs_reset(live, "expected < queue size")


def test_next_index_out_of_range_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.put_descriptor(0, BUFFERS, 8, WRITE | NEXT, following=0xFFFF)
    live.make_available(0)
    live.kick()
    assert_stopped_with_needs_reset(live, "descriptor index 65535")


def test_avail_index_running_ahead_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.memory.put("<H", AVAIL_RING + vu.VIRTQ_AVAIL_IDX, QUEUE_SIZE + 1)
    live.kick()
    assert_stopped_with_needs_reset(live, "ahead")


def test_indirect_descriptor_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.put_descriptor(0, BUFFERS, 16, vu.DescFlag.INDIRECT)
    live.make_available(0)
    live.kick()
    assert_stopped_with_needs_reset(live, "INDIRECT")


def test_buffer_wrapping_the_address_space_sets_needs_reset(live: LinuxLikeDriver) -> None:
    live.put_descriptor(0, vu.VIRTQ_ADDRESS_LIMIT - 8, 64, WRITE)
    live.make_available(0)
    live.kick()
    assert_stopped_with_needs_reset(live, "wraps")


def test_huge_buffer_gets_at_most_one_request_worth(live: LinuxLikeDriver) -> None:
    rng = live.device
    assert isinstance(rng, VirtioRng)
    live.put_descriptor(0, BUFFERS, 0xFFFF_FFFF, WRITE | NEXT, following=1)
    live.put_descriptor(1, BUFFERS, 0xFFFF_FFFF, WRITE)
    live.make_available(0)
    live.kick()
    assert live.used_element(0) == (0, MAX_REQUEST_BYTES)
    assert rng.position == MAX_REQUEST_BYTES
    end = BUFFERS + MAX_REQUEST_BYTES
    assert live.memory.data[BUFFERS:end] == expected_stream(SEED, 0, MAX_REQUEST_BYTES)
    assert live.memory.data[end : end + 16] == bytes(16)


@pytest.mark.parametrize(
    ("size", "desc", "reason"),
    [
        (3, DESC_TABLE, "power of two"),
        (0, DESC_TABLE, "power of two"),
        (DEFAULT_QUEUE_MAX_SIZE * 2, DESC_TABLE, "power of two"),
        (QUEUE_SIZE, DESC_TABLE + 8, "alignment"),
        (QUEUE_SIZE, vu.VIRTQ_ADDRESS_LIMIT - 16, "64-bit space"),
    ],
)
def test_bad_queue_layout_sets_needs_reset_at_enable(
    driver: LinuxLikeDriver, size: int, desc: int, reason: str
) -> None:
    driver.enable_bus_master()
    assert driver.negotiate()
    driver.setup_queue(size=size, desc=desc)
    assert needs_reset(driver)
    assert reason in (driver.device.needs_reset_reason or "")
    assert driver.read(vu.CommonCfg.QUEUE_ENABLE) == 0


def test_dma_fault_on_buffer_stops_the_request_then_retry_succeeds(live: LinuxLikeDriver) -> None:
    rng = live.device
    assert isinstance(rng, VirtioRng)
    live.memory.refused.append((BUFFERS, BUFFERS + 0x1000))
    live.put_descriptor(0, BUFFERS, 32, WRITE)
    live.make_available(0)
    live.kick()
    assert rng.dma_faults == 1 and rng.last_dma_fault is not None
    assert rng.last_dma_fault.iova == BUFFERS and rng.last_dma_fault.write
    assert live.used_idx() == 0 and rng.position == 0
    assert not needs_reset(live) and not rng.pci.intx.asserted
    live.memory.refused.clear()
    live.kick()
    assert live.used_element(0) == (0, 32)
    assert live.memory.data[BUFFERS : BUFFERS + 32] == expected_stream(SEED, 0, 32)


@pytest.mark.parametrize("refused", [DESC_TABLE, AVAIL_RING, USED_RING])
def test_dma_fault_on_the_rings_is_contained(live: LinuxLikeDriver, refused: int) -> None:
    live.put_descriptor(0, BUFFERS, 32, WRITE)
    live.make_available(0)
    live.memory.refused.append((refused, refused + 0x1000))
    live.kick()
    assert live.device.dma_faults == 1
    assert live.device.requests_completed == 0
    assert not needs_reset(live)


def test_unbound_endpoint_refuses_dma_without_raising() -> None:
    device = VirtioRng()
    drv = LinuxLikeDriver(device, GuestMemory())
    drv.bring_up()
    drv.kick()
    assert device.dma_faults == 1
    assert device.last_dma_fault is not None and "no DMA port" in device.last_dma_fault.reason


@settings(max_examples=300, deadline=None)
@given(
    ring=st.binary(min_size=0x400, max_size=0x400),
    writes=st.lists(
        st.tuples(st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)),
        max_size=40,
    ),
)
def test_hostile_registers_and_rings_never_raise(
    ring: bytes, writes: list[tuple[int, int, int]]
) -> None:
    memory = GuestMemory(0x8000)
    device = VirtioRng()
    device.bind_dma(memory)
    drv = LinuxLikeDriver(device, memory)
    drv.bring_up()
    # Random descriptor table and rings, then random register traffic and doorbells.
    memory.data[DESC_TABLE : DESC_TABLE + len(ring)] = ring
    memory.data[AVAIL_RING : AVAIL_RING + len(ring)] = ring[::-1]
    drv.kick()
    for offset, size, value in writes:
        drv.bar.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        drv.bar.read(offset, size)
        drv.kick()
    # Whatever happened is accounted for: a stop names its reason, every
    # completion is in the used ring the driver sees.
    stopped = bool(device.status & vu.DeviceStatus.DEVICE_NEEDS_RESET)
    assert stopped == (device.needs_reset_reason is not None)
    queue = device.queues[0]
    if queue.enabled and queue.device == USED_RING:
        assert drv.used_idx() == queue.used_idx


# -- the generator ------------------------------------------------------------------------


def test_stream_is_the_documented_counter_mode_sha256() -> None:
    seed = 0x1234
    block = hashlib.sha256(
        b"vsmmu-virtio-rng\0" + seed.to_bytes(8, "little") + (1).to_bytes(8, "little")
    ).digest()
    assert expected_stream(seed, 32, 32) == block
    whole = expected_stream(seed, 0, 1000)
    assert expected_stream(seed, 123, 456) == whole[123:579]
    assert expected_stream(seed + 1, 0, 64) != whole[:64]
    assert locate_in_stream(seed, whole[500:532], 0, 1000) == 500
    assert locate_in_stream(seed, b"\0" * 32, 0, 1000) is None


def test_block_matching_explains_only_whole_granule_gaps() -> None:
    block = 4096
    stream = expected_stream(SEED, 0, 5 * block)
    # The guest read 3 blocks from offset 100; the kernel took 64 bytes after
    # the guest's first 4928 (a whole number of 32-byte granules).
    cut = 100 + 4928
    read = stream[100:cut] + stream[cut + 64 : 100 + 3 * block + 64]
    digests = [hashlib.sha256(read[i : i + block]).digest() for i in range(0, 3 * block, block)]
    match = match_stream_blocks(SEED, 100, digests, block)
    assert match is not None and match.skipped == 64 and match.gaps == ((1, 64),)
    corrupted = bytearray(read)
    corrupted[7000] ^= 1
    bad = [hashlib.sha256(corrupted[i : i + block]).digest() for i in range(0, 3 * block, block)]
    assert match_stream_blocks(SEED, 100, bad, block) is None
    assert match_stream_blocks(SEED, 132, digests, block) is None


def test_block_matching_explains_a_take_straddling_the_drivers_buffer() -> None:
    # A fill-kthread take split across virtio-rng's internal buffer: the guest's
    # block misses 32 bytes, keeps the next 32, then misses 32 more.
    block = 4096
    stream = expected_stream(SEED, 0, 4 * block)
    cut = 1024
    read = stream[:cut] + stream[cut + 32 : cut + 64] + stream[cut + 96 : block + 64]
    assert len(read) == block
    match = match_stream_blocks(SEED, 0, [hashlib.sha256(read).digest()], block)
    assert match is not None
    assert match.gaps == ((0, 32), (0, 32)) and match.skipped == 64
    assert match.block_bytes == (read,)


def test_block_matching_refuses_three_gaps_and_reports_the_bytes_it_compared() -> None:
    block = 1024
    stream = expected_stream(SEED, 0, 4 * block)
    whole = [stream[i : i + block] for i in range(0, 2 * block, block)]
    match = match_stream_blocks(SEED, 0, [hashlib.sha256(b).digest() for b in whole], block)
    assert match is not None and match.gaps == () and match.block_bytes == tuple(whole)
    three = stream[:96] + stream[128:160] + stream[192:224] + stream[256 : block + 96]
    assert len(three) == block
    assert match_stream_blocks(SEED, 0, [hashlib.sha256(three).digest()], block) is None
