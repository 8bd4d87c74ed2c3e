"""A modern (virtio 1.x, non-transitional) virtio-pci transport on the vfio-user device API.

The function has one 64-bit prefetchable memory BAR holding the four
structures its vendor-specific PCI capabilities point at (virtio 1.2
§4.1.4): common configuration, ISR status, device configuration and the
notification area.  Interrupts are INTx only: behind the vSMMU an MSI write
would carry an IOVA QEMU delivers untranslated (DESIGN.md §5), so there is
no MSI-X capability and the vector registers read VIRTIO_MSI_NO_VECTOR.

The device offers VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM: without
the latter Linux hands the device guest-physical addresses and skips the DMA
API, and nothing would go through the IOMMU.  All ring and buffer accesses
go through the endpoint's DMA port.

Guest input is hostile.  A malformed ring (:class:`VirtqueueError`) sets
DEVICE_NEEDS_RESET and raises a configuration interrupt; the device then
processes nothing until the driver resets it.  A refused DMA stops the
request in progress without consuming it, is logged and counted, and the
queue is tried again at the next notification.  No register handler raises.

A doorbell does not do the queue's work inside the register write: it marks
the queue kicked and the work runs later on the event loop, in turns of at
most :data:`WORK_BYTES_PER_TURN` bytes (at least one request), each turn
scheduled behind whatever else is ready.  A guest that keeps a queue full and
rings without pause thus gets one turn at a time, between the SMMU's register
accesses, the other endpoints and the monitor, instead of holding the one loop
they all share.  Outside an event loop (tests driving the device directly)
the turns run at once, one after the other.

Subclasses give the device id, queue count, device features and config
bytes, and implement :meth:`VirtioPciEndpoint.handle_request`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import struct
from typing import Any

from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import DmaPort, Endpoint, EndpointDmaError
from vsmmu.endpoints.virtqueue import DescriptorChain, SplitVirtqueue, VirtqueueError
from vsmmu.vfio_user import BarRegion, PciCapability, PciDevice, PciIdentity
from vsmmu.vfio_user import uapi as pci

logger = logging.getLogger(__name__)
#: One line per guest register access (enable DEBUG on this logger for a trace).
trace = logging.getLogger(__name__ + ".trace")

#: The BAR holding all virtio structures, and where each lives in it.
VIRTIO_BAR = pci.PciRegion.BAR0
VIRTIO_BAR_SIZE = 0x4000
COMMON_CFG_OFFSET = 0x0000
ISR_OFFSET = 0x1000
ISR_LENGTH = 4
DEVICE_CFG_OFFSET = 0x2000
#: The device-config window is never shorter than a dword (Linux maps it with ioread32).
DEVICE_CFG_MIN_LENGTH = 4
NOTIFY_OFFSET = 0x3000
#: Each queue's doorbell is ``queue_notify_off * NOTIFY_MULTIPLIER`` into the notify area.
NOTIFY_MULTIPLIER = 4
#: What ``queue_size`` reads after reset unless the device says otherwise.
DEFAULT_QUEUE_MAX_SIZE = 64

#: Request bytes one turn of queue work may produce before yielding the loop.
WORK_BYTES_PER_TURN = 64 * 1024

_BYTE_BITS = 8
_REGISTER_AT = {register.value: register for register in vu.CommonCfg}
_HIGH_HALF = {
    vu.CommonCfg.QUEUE_DESC_LO: vu.CommonCfg.QUEUE_DESC_HI,
    vu.CommonCfg.QUEUE_DRIVER_LO: vu.CommonCfg.QUEUE_DRIVER_HI,
    vu.CommonCfg.QUEUE_DEVICE_LO: vu.CommonCfg.QUEUE_DEVICE_HI,
}
_DWORD = 4
_DWORD_BITS = 32
_DWORD_MASK = (1 << _DWORD_BITS) - 1
_U8_MASK = 0xFF


def virtio_capability(
    cfg_type: vu.VirtioPciCapType, offset: int, length: int, multiplier: int | None = None
) -> PciCapability:
    """A ``virtio_pci_cap`` (or ``virtio_pci_notify_cap``) pointing into :data:`VIRTIO_BAR`."""
    size = vu.VIRTIO_PCI_CAP_SIZEOF if multiplier is None else vu.VIRTIO_PCI_NOTIFY_CAP_SIZEOF
    body = bytearray(size)
    body[vu.VIRTIO_PCI_CAP_LEN] = size
    body[vu.VIRTIO_PCI_CAP_CFG_TYPE] = cfg_type
    body[vu.VIRTIO_PCI_CAP_BAR] = VIRTIO_BAR
    struct.pack_into("<I", body, vu.VIRTIO_PCI_CAP_OFFSET, offset)
    struct.pack_into("<I", body, vu.VIRTIO_PCI_CAP_LENGTH, length)
    if multiplier is not None:
        struct.pack_into("<I", body, vu.VIRTIO_PCI_NOTIFY_CAP_MULT, multiplier)
    return PciCapability(pci.PCI_CAP_ID_VNDR, bytes(body))


def ats_capability() -> PciCapability:
    """A PCIe ATS extended capability: capability register 0, control writable (STU, Enable)."""
    wmask = bytearray(pci.PCI_EXT_CAP_ATS_SIZEOF)
    writable = pci.PCI_ATS_CTRL_ENABLE | pci.PCI_ATS_CTRL_STU_MASK
    wmask[pci.PCI_ATS_CTRL : pci.PCI_ATS_CTRL + 2] = writable.to_bytes(2, "little")
    return PciCapability(
        pci.PCI_EXT_CAP_ID_ATS, bytes(pci.PCI_EXT_CAP_ATS_SIZEOF), wmask=bytes(wmask)
    )


class VirtioPciEndpoint(Endpoint):
    """The transport: PCI function, common config, ISR, notify, device status, queues."""

    #: An emulated function: its INTx line and config space are ours to drive.
    pci: PciDevice

    def __init__(
        self,
        name: str,
        device_id: vu.VirtioDeviceId,
        *,
        num_queues: int,
        device_features: int = 0,
        queue_max_size: int = DEFAULT_QUEUE_MAX_SIZE,
        class_code: int = vu.PCI_CLASS_OTHERS,
        ats: bool = False,
    ) -> None:
        super().__init__(name)
        self.device_id = device_id
        self.features = (
            device_features
            | 1 << vu.VirtioFeature.VERSION_1
            | 1 << vu.VirtioFeature.ACCESS_PLATFORM
        )
        self.queues = [
            SplitVirtqueue(index, queue_max_size, self._dma_port) for index in range(num_queues)
        ]
        self.ats = ats
        identity = PciIdentity(
            vendor_id=vu.VIRTIO_PCI_VENDOR_ID,
            device_id=vu.VIRTIO_PCI_MODERN_DEVICE_BASE + device_id,
            class_code=class_code,
            subsystem_vendor_id=vu.VIRTIO_PCI_VENDOR_ID,
            subsystem_id=vu.VIRTIO_PCI_MODERN_DEVICE_BASE + device_id,
            revision=vu.VIRTIO_PCI_MODERN_REVISION,
        )
        device_cfg_length = max(len(self.device_config()), DEVICE_CFG_MIN_LENGTH)
        capabilities = [
            virtio_capability(
                vu.VirtioPciCapType.COMMON_CFG, COMMON_CFG_OFFSET, vu.VIRTIO_PCI_COMMON_CFG_SIZE
            ),
            virtio_capability(vu.VirtioPciCapType.ISR_CFG, ISR_OFFSET, ISR_LENGTH),
            virtio_capability(vu.VirtioPciCapType.DEVICE_CFG, DEVICE_CFG_OFFSET, device_cfg_length),
            virtio_capability(
                vu.VirtioPciCapType.NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_MULTIPLIER * num_queues,
                multiplier=NOTIFY_MULTIPLIER,
            ),
        ]
        bar = BarRegion(
            VIRTIO_BAR_SIZE, self._bar_read, self._bar_write, is_64bit=True, prefetchable=True
        )
        self.pci = PciDevice(
            identity,
            {VIRTIO_BAR: bar},
            intx=True,
            capabilities=capabilities,
            ext_capabilities=[ats_capability()] if ats else [],
            on_reset=self.reset,
            on_disconnect=self.reset,
        )
        # Observability: what the device did, for tests and the service's QMP.
        self.requests_completed = 0
        self.interrupts = 0
        self.dma_faults = 0
        self.last_dma_fault: EndpointDmaError | None = None
        self.needs_reset_reason: str | None = None
        # Queues rung and not yet drained, in ring order; whether a turn is scheduled.
        self._kicked: dict[int, None] = {}
        self._turn_scheduled = False
        self._transport_reset()

    # -- the device's part ---------------------------------------------------

    def device_config(self) -> bytes:
        """The device-specific configuration structure (empty by default)."""
        return b""

    @abc.abstractmethod
    def handle_request(self, queue: int, chain: DescriptorChain) -> int:
        """Serve one request; return the number of bytes written into its buffers.

        Must not change device state a retry would see differently: the
        transport calls :meth:`request_completed` once the used ring says so.

        :raises EndpointDmaError: a buffer access was refused.
        :raises VirtqueueError: the request is malformed for this device.
        """

    def request_completed(self, queue: int, chain: DescriptorChain, written: int) -> None:
        """The used ring now holds ``chain`` with ``written`` bytes (a hook)."""

    def device_reset(self) -> None:
        """Device-specific part of :meth:`reset` (a hook)."""

    # -- reset ---------------------------------------------------------------

    def reset(self) -> None:
        """Function reset: the transport as after a status-0 write, plus the device's state."""
        self._transport_reset()
        self.device_reset()

    def _transport_reset(self) -> None:
        self.status = vu.DeviceStatus(0)
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_generation = 0
        self.isr = vu.IsrStatus(0)
        self.needs_reset_reason = None
        for queue in self.queues:
            queue.reset()
        self._kicked.clear()
        self.pci.intx.deassert_level()

    def _dma_port(self) -> DmaPort:
        return self.dma

    # -- BAR dispatch --------------------------------------------------------

    def _bar_read(self, offset: int, size: int) -> int:
        try:
            value = self._dispatch_read(offset, size)
        except Exception:  # a handler must never fail the guest's access
            logger.exception("%s: BAR read %#x/%d failed", self.name, offset, size)
            value = 0
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s read %#x/%d -> %#x", self.name, offset, size, value)
        return value & ((1 << (_BYTE_BITS * size)) - 1)

    def _bar_write(self, offset: int, data: bytes) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s write %#x/%d <- %s", self.name, offset, len(data), data.hex())
        try:
            self._dispatch_write(offset, data)
        except Exception:  # a handler must never fail the guest's access
            logger.exception("%s: BAR write %#x/%d failed", self.name, offset, len(data))
            self._set_needs_reset(f"internal error on BAR write at {offset:#x}")

    def _dispatch_read(self, offset: int, size: int) -> int:
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + vu.VIRTIO_PCI_COMMON_CFG_SIZE:
            image = self._common_image()
            start = offset - COMMON_CFG_OFFSET
            return int.from_bytes(image[start : start + size].ljust(size, b"\0"), "little")
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            return self._read_isr() if offset == ISR_OFFSET else 0
        config = self.device_config()
        config_end = DEVICE_CFG_OFFSET + max(len(config), DEVICE_CFG_MIN_LENGTH)
        if DEVICE_CFG_OFFSET <= offset < config_end:
            start = offset - DEVICE_CFG_OFFSET
            return int.from_bytes(config[start : start + size].ljust(size, b"\0"), "little")
        return 0

    def _dispatch_write(self, offset: int, data: bytes) -> None:
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + vu.VIRTIO_PCI_COMMON_CFG_SIZE:
            self._write_common(offset - COMMON_CFG_OFFSET, data)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.queues):
            relative = offset - NOTIFY_OFFSET
            if relative % NOTIFY_MULTIPLIER:
                logger.warning("%s: notify write at %#x is not a doorbell", self.name, offset)
                return
            self.notify(relative // NOTIFY_MULTIPLIER)
        else:
            logger.debug("%s: write to %#x ignored (read-only or unused)", self.name, offset)

    # -- common configuration ------------------------------------------------

    @property
    def selected_queue(self) -> SplitVirtqueue | None:
        """The queue ``queue_select`` names, or None past the last queue."""
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    def _feature_window(self, features: int, select: int) -> int:
        return (features >> (vu.FEATURE_WINDOW_BITS * select)) & _DWORD_MASK

    def _common_values(self) -> dict[vu.CommonCfg, int]:
        queue = self.selected_queue
        reg = vu.CommonCfg
        values = {
            reg.DEVICE_FEATURE_SELECT: self.device_feature_select,
            reg.DEVICE_FEATURE: self._feature_window(self.features, self.device_feature_select),
            reg.DRIVER_FEATURE_SELECT: self.driver_feature_select,
            reg.DRIVER_FEATURE: self._feature_window(
                self.driver_features, self.driver_feature_select
            ),
            reg.CONFIG_MSIX_VECTOR: vu.VIRTIO_MSI_NO_VECTOR,
            reg.NUM_QUEUES: len(self.queues),
            reg.DEVICE_STATUS: int(self.status),
            reg.CONFIG_GENERATION: self.config_generation,
            reg.QUEUE_SELECT: self.queue_select,
            reg.QUEUE_MSIX_VECTOR: vu.VIRTIO_MSI_NO_VECTOR,
        }
        if queue is not None:
            values |= {
                reg.QUEUE_SIZE: queue.size,
                reg.QUEUE_ENABLE: int(queue.enabled),
                reg.QUEUE_NOTIFY_OFF: queue.index,
                reg.QUEUE_DESC_LO: queue.desc & _DWORD_MASK,
                reg.QUEUE_DESC_HI: queue.desc >> _DWORD_BITS,
                reg.QUEUE_DRIVER_LO: queue.driver & _DWORD_MASK,
                reg.QUEUE_DRIVER_HI: queue.driver >> _DWORD_BITS,
                reg.QUEUE_DEVICE_LO: queue.device & _DWORD_MASK,
                reg.QUEUE_DEVICE_HI: queue.device >> _DWORD_BITS,
            }
        return values

    def _common_image(self) -> bytes:
        image = bytearray(vu.VIRTIO_PCI_COMMON_CFG_SIZE)
        for register, value in self._common_values().items():
            width = vu.COMMON_CFG_WIDTH[register]
            image[register : register + width] = value.to_bytes(width, "little")
        return bytes(image)

    def _write_common(self, offset: int, data: bytes) -> None:
        register = _REGISTER_AT.get(offset)
        if register in _HIGH_HALF and len(data) == 2 * _DWORD:
            # A 64-bit store to an address register: its two halves in order.
            self._write_register(register, int.from_bytes(data[:_DWORD], "little"))
            self._write_register(_HIGH_HALF[register], int.from_bytes(data[_DWORD:], "little"))
            return
        if register is None or vu.COMMON_CFG_WIDTH[register] != len(data):
            logger.warning(
                "%s: common-config write %#x/%d matches no register; ignored",
                self.name, offset, len(data),
            )  # fmt: skip
            return
        self._write_register(register, int.from_bytes(data, "little"))

    def _write_register(self, register: vu.CommonCfg, value: int) -> None:
        reg = vu.CommonCfg
        if register == reg.DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif register == reg.DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif register == reg.DRIVER_FEATURE:
            self._write_driver_features(value)
        elif register == reg.DEVICE_STATUS:
            self._write_status(value)
        elif register == reg.QUEUE_SELECT:
            self.queue_select = value
        elif register in (reg.CONFIG_MSIX_VECTOR, reg.QUEUE_MSIX_VECTOR):
            pass  # no MSI-X: the vector registers keep reading NO_VECTOR
        else:
            self._write_queue_register(register, value)

    def _write_driver_features(self, value: int) -> None:
        if self.status & vu.DeviceStatus.FEATURES_OK:
            logger.warning("%s: driver features written after FEATURES_OK; ignored", self.name)
            return
        if self.driver_feature_select > 1:
            return  # windows past the 64 defined feature bits hold nothing
        shift = vu.FEATURE_WINDOW_BITS * self.driver_feature_select
        kept = self.driver_features & ~(_DWORD_MASK << shift)
        self.driver_features = kept | value << shift

    def _write_queue_register(self, register: vu.CommonCfg, value: int) -> None:
        queue = self.selected_queue
        if queue is None:
            logger.warning(
                "%s: %s write with queue_select %d (only %d queues); ignored",
                self.name, register.name, self.queue_select, len(self.queues),
            )  # fmt: skip
            return
        if register == vu.CommonCfg.QUEUE_ENABLE:
            self._write_queue_enable(queue, value)
            return
        if queue.enabled:
            logger.warning(
                "%s: %s write to enabled queue %d; ignored", self.name, register.name, queue.index
            )
            return
        reg = vu.CommonCfg
        if register == reg.QUEUE_SIZE:
            queue.size = value
        elif register in (reg.QUEUE_DESC_LO, reg.QUEUE_DESC_HI):
            queue.desc = _set_half(queue.desc, value, high=register == reg.QUEUE_DESC_HI)
        elif register in (reg.QUEUE_DRIVER_LO, reg.QUEUE_DRIVER_HI):
            queue.driver = _set_half(queue.driver, value, high=register == reg.QUEUE_DRIVER_HI)
        elif register in (reg.QUEUE_DEVICE_LO, reg.QUEUE_DEVICE_HI):
            queue.device = _set_half(queue.device, value, high=register == reg.QUEUE_DEVICE_HI)
        else:
            logger.debug("%s: write to read-only %s ignored", self.name, register.name)

    def _write_queue_enable(self, queue: SplitVirtqueue, value: int) -> None:
        if value != 1:
            # Only VIRTIO_F_RING_RESET lets a driver disable a queue; not offered.
            logger.warning("%s: queue %d enable=%d ignored", self.name, queue.index, value)
            return
        if queue.enabled:
            return
        try:
            queue.check_layout()
        except VirtqueueError as exc:
            self._set_needs_reset(str(exc))
            return
        queue.enabled = True
        logger.info(
            "%s: queue %d enabled: size %d desc %#x driver %#x device %#x",
            self.name, queue.index, queue.size, queue.desc, queue.driver, queue.device,
        )  # fmt: skip

    def _write_status(self, value: int) -> None:
        if value == 0:
            logger.info("%s: reset by the driver (status 0)", self.name)
            self._transport_reset()
            return
        status = vu.DeviceStatus(value & _U8_MASK)
        newly = status & ~self.status
        if newly & vu.DeviceStatus.FEATURES_OK and not self._features_acceptable():
            status &= ~vu.DeviceStatus.FEATURES_OK
        if self.status & vu.DeviceStatus.DEVICE_NEEDS_RESET:
            status |= vu.DeviceStatus.DEVICE_NEEDS_RESET  # only a reset clears it
        self.status = status
        logger.debug("%s: status %s", self.name, status)

    def _features_acceptable(self) -> bool:
        unknown = self.driver_features & ~self.features
        if unknown:
            logger.warning(
                "%s: driver accepted features %#x the device does not offer; FEATURES_OK refused",
                self.name, unknown,
            )  # fmt: skip
            return False
        if not self.driver_features >> vu.VirtioFeature.VERSION_1 & 1:
            logger.warning("%s: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused",
                           self.name)  # fmt: skip
            return False
        return True

    def feature_negotiated(self, bit: vu.VirtioFeature) -> bool:
        """True when the driver accepted feature ``bit`` and FEATURES_OK stuck."""
        return bool(self.status & vu.DeviceStatus.FEATURES_OK) and bool(
            self.driver_features >> bit & 1
        )

    # -- ISR and interrupts -------------------------------------------------

    def _read_isr(self) -> int:
        """Reading ISR returns and clears it, and drops the INTx line."""
        value = int(self.isr)
        self.isr = vu.IsrStatus(0)
        self.pci.intx.deassert_level()
        return value

    def _interrupt(self, cause: vu.IsrStatus) -> None:
        self.isr |= cause
        self.interrupts += 1
        self.pci.intx.assert_level()

    def _set_needs_reset(self, reason: str) -> None:
        if self.status & vu.DeviceStatus.DEVICE_NEEDS_RESET:
            return
        logger.warning("%s: DEVICE_NEEDS_RESET: %s", self.name, reason)
        self.needs_reset_reason = reason
        self.status |= vu.DeviceStatus.DEVICE_NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & _U8_MASK
        self._interrupt(vu.IsrStatus.CONFIG)

    # -- queue processing ---------------------------------------------------

    def _bus_master(self) -> bool:
        command = self.pci.config.read_u16(pci.PCI_COMMAND)
        return bool(command & pci.PCI_COMMAND_MASTER)

    def notify(self, index: int) -> None:
        """The driver rang queue ``index``'s doorbell: serve what it made available
        (in later turns of the event loop, see the module docstring)."""
        if index >= len(self.queues):
            logger.warning("%s: notify for queue %d of %d", self.name, index, len(self.queues))
            return
        queue = self.queues[index]
        if not self._live(queue):
            logger.warning(
                "%s: notify for queue %d ignored (status %s, enabled %s)",
                self.name, index, self.status, queue.enabled,
            )  # fmt: skip
            return
        if not self._bus_master():
            logger.warning("%s: notify for queue %d but bus mastering is off", self.name, index)
            return
        self._kicked[index] = None
        if not self._turn_scheduled:
            self._schedule_turn()

    def _live(self, queue: SplitVirtqueue) -> bool:
        live = vu.DeviceStatus.DRIVER_OK | vu.DeviceStatus.FEATURES_OK
        return (
            self.status & live == live
            and not self.status & (vu.DeviceStatus.DEVICE_NEEDS_RESET | vu.DeviceStatus.FAILED)
            and queue.enabled
        )

    def _schedule_turn(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            while self._kicked:
                self._turn()
            return
        self._turn_scheduled = True
        loop.call_soon(self._turn)

    def _turn(self) -> None:
        """One bounded turn of queue work; schedules the next while work is left."""
        self._turn_scheduled = False
        budget = WORK_BYTES_PER_TURN
        for index in list(self._kicked):
            queue = self.queues[index]
            done, more = (0, False)
            if self._live(queue) and self._bus_master():
                done, more = self._process(queue, budget)
            if not more:
                del self._kicked[index]
            budget -= done
            if budget <= 0:
                break
        if self._kicked and not self._turn_scheduled:
            self._schedule_turn()

    def _process(self, queue: SplitVirtqueue, budget: int) -> tuple[int, bool]:
        """Serve requests until ``budget`` bytes (at least one request); returns the bytes
        written and whether requests are still waiting."""
        completed = 0
        done = 0
        more = False
        try:
            # Never past what the ring had available at the start of the turn.
            for _ in range(queue.pending()):
                if completed and done >= budget:
                    more = True
                    break
                chain = queue.peek()
                written = self.handle_request(queue.index, chain)
                queue.complete(chain, written)
                completed += 1
                done += max(written, 1)
                self.requests_completed += 1
                self.request_completed(queue.index, chain, written)
            suppressed = completed > 0 and queue.interrupts_suppressed()
        except VirtqueueError as exc:
            self._set_needs_reset(str(exc))
            return done, False
        except EndpointDmaError as exc:
            self.dma_faults += 1
            self.last_dma_fault = exc
            logger.warning(
                "%s: queue %d request stopped by a DMA fault: %s", self.name, queue.index, exc
            )
            suppressed = False
            more = False
        if completed and not suppressed:
            self._interrupt(vu.IsrStatus.QUEUE)
        return done, more

    def stats(self) -> dict[str, Any]:
        """Counters and state for tests and the service's QMP."""
        return {
            "name": self.name,
            "status": int(self.status),
            "driver_features": self.driver_features,
            "queues_enabled": [queue.enabled for queue in self.queues],
            "requests_completed": self.requests_completed,
            "interrupts": self.interrupts,
            "dma_faults": self.dma_faults,
            "last_dma_fault": str(self.last_dma_fault) if self.last_dma_fault else None,
            "needs_reset_reason": self.needs_reset_reason,
            "ats": self.ats,
        }


def _set_half(value: int, half: int, *, high: bool) -> int:
    if high:
        return (value & _DWORD_MASK) | (half & _DWORD_MASK) << _DWORD_BITS
    return (value & ~_DWORD_MASK) | (half & _DWORD_MASK)
