"""iommu-testdev: QEMU's bare-metal IOMMU test device, emulated behind our vSMMU.

QEMU 11.1 ships ``iommu-testdev`` (``docs/specs/iommu-testdev.rst``): a PCI
function with one 4 KiB memory BAR of 32-bit little-endian registers that
performs one DMA through the IOMMU when its trigger register is read.  QEMU
runs that DMA inside its own process, so it can never reach an SMMU outside
QEMU; this endpoint gives our vSMMU the same device, register for register,
so one test program drives either (DESIGN.md §11).

Registers (offsets into BAR0; any other offset reads 0 and ignores writes;
only aligned 4-byte accesses do anything):

=======  ==========  ==========================================================
offset   name        behaviour
=======  ==========  ==========================================================
0x00     TRIGGER     read: run the armed DMA, then read 0; unarmed: RESULT
                     becomes NOT_ARMED
0x04/08  GVA lo/hi   the IOVA the DMA writes (through the IOMMU)
0x0c     LEN         bytes to write (0 → BAD_LEN)
0x10     RESULT      IDLE, BUSY, 0 (ok) or an error code; writable
0x14     DBELL       write bit 0 = 1: arm (RESULT BUSY); 0: disarm (IDLE)
0x18     ATTRS       bit 0 secure, bits 2:1 address space, bit 3 space valid
0x1c/20  GPA lo/hi   where the written bytes must land (read back untranslated)
=======  ==========  ==========================================================

The DMA: LEN bytes of :data:`WRITE_PATTERN` (little-endian, repeated) are
written at GVA through the endpoint's DMA port — the IOMMU — (refused →
TX_FAIL); then LEN bytes are read at GPA from guest-physical memory with no
translation (refused → RD_FAIL) and compared (different → MISMATCH).  ATTRS
whose secure bit contradicts a valid Secure/Non-secure space give BAD_ATTRS
before any access.  The request is disarmed afterwards whatever happened.

Our vSMMU has no Secure state, so every DMA is issued Non-secure, whatever
ATTRS says once it is consistent.  The untranslated read goes to the guest
RAM QEMU maps into this function (its vfio-user DMA map table), which is the
guest-physical address space: with no vIOMMU in QEMU's view, QEMU maps all of
it here.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from vsmmu.endpoints.base import Endpoint, EndpointDmaError, EndpointSpecError
from vsmmu.endpoints.virtio_uapi import PCI_CLASS_OTHERS
from vsmmu.vfio_user import BarRegion, DmaError, PciDevice, PciIdentity
from vsmmu.vfio_user import uapi as pci

logger = logging.getLogger(__name__)
#: One line per guest register access (enable DEBUG on this logger for a trace).
trace = logging.getLogger(__name__ + ".trace")

#: Red Hat's vendor id and its "test device" id (QEMU's PCI_DEVICE_ID_REDHAT_TEST).
VENDOR_ID = 0x1B36
DEVICE_ID = 0x0005
TESTDEV_BAR = pci.PciRegion.BAR0
BAR_SIZE = 0x1000
#: The only access size the registers answer.
REGISTER_BYTES = 4
_REGISTER_MASK = (1 << (8 * REGISTER_BYTES)) - 1
_HALF_SHIFT = 32
#: The value whose little-endian bytes, repeated, the DMA writes.
WRITE_PATTERN = 0x12345678
#: Largest DMA one trigger performs: LEN is a guest-controlled 32-bit value, and
#: what QEMU's device would allocate for it is no reason for us to allocate it.
MAX_DMA_BYTES = 1 << 20


class Register(enum.IntEnum):
    """BAR0 register offsets."""

    TRIGGER = 0x00
    GVA_LO = 0x04
    GVA_HI = 0x08
    LEN = 0x0C
    RESULT = 0x10
    DBELL = 0x14
    ATTRS = 0x18
    GPA_LO = 0x1C
    GPA_HI = 0x20


class Result(enum.IntEnum):
    """What RESULT reads."""

    OK = 0x0000_0000
    BAD_LEN = 0xDEAD_0001
    TX_FAIL = 0xDEAD_0002
    RD_FAIL = 0xDEAD_0003
    MISMATCH = 0xDEAD_0004
    NOT_ARMED = 0xDEAD_0005
    BAD_ATTRS = 0xDEAD_0006
    BUSY = 0xFFFF_FFFE
    IDLE = 0xFFFF_FFFF


class Space(enum.IntEnum):
    """ATTRS bits 2:1: the Arm security space of the access."""

    SECURE = 0
    NONSECURE = 1
    ROOT = 2
    REALM = 3


DBELL_ARM = 1 << 0
ATTRS_SECURE = 1 << 0
ATTRS_SPACE_SHIFT = 1
ATTRS_SPACE_MASK = 0x3
ATTRS_SPACE_VALID = 1 << 3
#: ATTRS after reset: space Non-secure, not marked valid.
ATTRS_RESET = Space.NONSECURE << ATTRS_SPACE_SHIFT


def pattern_bytes(length: int) -> bytes:
    """The ``length`` bytes the DMA writes: :data:`WRITE_PATTERN` little-endian, repeated."""
    word = WRITE_PATTERN.to_bytes(REGISTER_BYTES, "little")
    return (word * (length // REGISTER_BYTES + 1))[:length]


def attrs_inconsistent(attrs: int) -> bool:
    """True when a valid Secure/Non-secure space contradicts the secure bit."""
    if not attrs & ATTRS_SPACE_VALID:
        return False
    space = (attrs >> ATTRS_SPACE_SHIFT) & ATTRS_SPACE_MASK
    if space not in (Space.SECURE, Space.NONSECURE):
        return False
    return bool(attrs & ATTRS_SECURE) != (space == Space.SECURE)


class IommuTestdev(Endpoint):
    """The register file and the one-shot DMA of ``iommu-testdev`` (module docstring)."""

    KIND = "iommu-testdev"

    def __init__(self, name: str = "iommu-testdev0") -> None:
        super().__init__(name)
        identity = PciIdentity(vendor_id=VENDOR_ID, device_id=DEVICE_ID,
                               class_code=PCI_CLASS_OTHERS)
        bar = BarRegion(BAR_SIZE, self._bar_read, self._bar_write)
        self.pci = PciDevice(identity, {TESTDEV_BAR: bar}, intx=False,
                             on_reset=self.reset, on_disconnect=self.reset)
        # Observability for tests and QMP: DMAs run and how each ended.
        self.dmas = 0
        self.last_result: Result | None = None
        self.last_dma_fault: EndpointDmaError | None = None
        self.reset()

    @classmethod
    def from_options(cls, spec: str, options: dict[str, str]) -> IommuTestdev:
        """Build from spec options (only ``name``).

        :raises EndpointSpecError: an unknown option.
        """
        unknown = sorted(set(options) - {"name"})
        if unknown:
            raise EndpointSpecError(
                f"endpoint spec {spec!r}: unknown option(s) {unknown}, expected ['name']"
            )
        return cls(options.get("name", "iommu-testdev0"))

    def reset(self) -> None:
        """Power-on state: addresses and length 0, RESULT IDLE, disarmed, ATTRS Non-secure."""
        self.gva = 0
        self.gpa = 0
        self.length = 0
        self.result = int(Result.IDLE)
        self.armed = False
        self.attrs = int(ATTRS_RESET)

    def stats(self) -> dict[str, Any]:
        """Counters for QMP: DMAs run, the last result, the last refused access."""
        return {"dmas": self.dmas,
                "last-result": None if self.last_result is None else self.last_result.name,
                "last-dma-fault": None if self.last_dma_fault is None
                else str(self.last_dma_fault)}

    # -- the DMA ---------------------------------------------------------------

    def run_dma(self) -> Result:
        """What a TRIGGER read does: the armed DMA, its outcome in RESULT; then disarm."""
        if not self.armed:
            self.result = Result.NOT_ARMED
            return Result.NOT_ARMED
        outcome = self._dma()
        self.dmas += 1
        self.last_result = outcome
        self.result = outcome
        self.armed = False
        return outcome

    def _dma(self) -> Result:
        if not self.length:
            return Result.BAD_LEN
        if attrs_inconsistent(self.attrs):
            return Result.BAD_ATTRS
        if self.length > MAX_DMA_BYTES:
            logger.warning("%s: LEN %#x over the %#x this endpoint performs: BAD_LEN",
                           self.name, self.length, MAX_DMA_BYTES)
            return Result.BAD_LEN
        written = pattern_bytes(self.length)
        try:
            self.dma.write(self.gva, written)
        except EndpointDmaError as exc:
            logger.info("%s: %s", self.name, exc)
            self.last_dma_fault = exc
            return Result.TX_FAIL
        try:
            landed = self.pci.dma.read(self.gpa, self.length)
        except DmaError as exc:
            logger.info("%s: untranslated read gpa=%#x length=%d: %s",
                        self.name, self.gpa, self.length, exc)
            return Result.RD_FAIL
        return Result.OK if landed == written else Result.MISMATCH

    # -- BAR -------------------------------------------------------------------

    def _bar_read(self, offset: int, size: int) -> int:
        value = 0
        if size == REGISTER_BYTES and offset % REGISTER_BYTES == 0:
            try:
                value = self._read_register(offset)
            except Exception:  # a handler must never fail the guest's access
                logger.exception("%s: BAR read %#x failed", self.name, offset)
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s read %#x/%d -> %#x", self.name, offset, size, value)
        return value

    def _read_register(self, offset: int) -> int:
        if offset == Register.TRIGGER:
            self.run_dma()
            return 0
        values: dict[int, int] = {
            Register.GVA_LO: self.gva & _REGISTER_MASK,
            Register.GVA_HI: self.gva >> _HALF_SHIFT,
            Register.GPA_LO: self.gpa & _REGISTER_MASK,
            Register.GPA_HI: self.gpa >> _HALF_SHIFT,
            Register.LEN: self.length,
            Register.RESULT: self.result,
            Register.ATTRS: self.attrs,
        }
        return values.get(offset, 0)

    def _bar_write(self, offset: int, data: bytes) -> None:
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s write %#x/%d <- %s", self.name, offset, len(data), data.hex())
        if len(data) != REGISTER_BYTES or offset % REGISTER_BYTES:
            return
        value = int.from_bytes(data, "little")
        high = ~_REGISTER_MASK
        if offset == Register.GVA_LO:
            self.gva = (self.gva & high) | value
        elif offset == Register.GVA_HI:
            self.gva = (self.gva & _REGISTER_MASK) | value << _HALF_SHIFT
        elif offset == Register.GPA_LO:
            self.gpa = (self.gpa & high) | value
        elif offset == Register.GPA_HI:
            self.gpa = (self.gpa & _REGISTER_MASK) | value << _HALF_SHIFT
        elif offset == Register.LEN:
            self.length = value
        elif offset == Register.RESULT:
            self.result = value
        elif offset == Register.DBELL:
            self.armed = bool(value & DBELL_ARM)
            self.result = Result.BUSY if self.armed else Result.IDLE
        elif offset == Register.ATTRS:
            self.attrs = value
