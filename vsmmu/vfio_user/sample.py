"""A minimal device on the vfio-user API: a scratch register, a write counter, INTx.

It is the example of how a device plugs in (regions with handlers, an IRQ, a
reset callback) and the device the vfio-user tests and the QEMU interop test
drive.  BAR0 registers, all 32 bits:

* ``SCRATCH`` — read/write;
* ``WRITE_COUNT`` — read-only, counts every write to BAR0;
* ``IRQ`` — writing non-zero asserts the INTx level, zero de-asserts it;
* ``LAST_WRITE`` — read-only, the value of the last write to any register;
* ``MAGIC`` — read-only identification value.
"""

from __future__ import annotations

import enum
import logging

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.device import BarRegion, PciDevice
from vsmmu.vfio_user.pci import PciIdentity

logger = logging.getLogger(__name__)

#: Red Hat's vendor id (QEMU's test devices use it); a device id of our own.
SAMPLE_IDENTITY = PciIdentity(
    vendor_id=0x1B36,
    device_id=0x10F0,
    class_code=0xFF0000,
    subsystem_vendor_id=0x1B36,
    subsystem_id=0x0001,
    revision=1,
)
SAMPLE_BAR_SIZE = 0x1000
SAMPLE_MAGIC = 0x5653_4D55  # "VSMU"
_REGISTER_BYTES = 4


class SampleReg(enum.IntEnum):
    """BAR0 register offsets of the sample device."""

    SCRATCH = 0x00
    WRITE_COUNT = 0x04
    IRQ = 0x08
    LAST_WRITE = 0x0C
    MAGIC = 0x10


class ScratchDevice:
    """The sample device's model: state plus the handlers it registers."""

    def __init__(self) -> None:
        self.scratch = 0
        self.write_count = 0
        self.last_write = 0
        #: Every BAR0 write in arrival order, as ``(offset, value)``.
        self.writes: list[tuple[int, int]] = []
        self.resets = 0
        self.disconnects = 0
        self.pci = PciDevice(
            SAMPLE_IDENTITY,
            {uapi.PciRegion.BAR0: BarRegion(SAMPLE_BAR_SIZE, self.read, self.write)},
            intx=True,
            on_reset=self.reset,
            on_disconnect=self.disconnected,
        )

    def read(self, offset: int, size: int) -> int:
        """BAR0 read handler."""
        register = offset - offset % _REGISTER_BYTES
        values: dict[int, int] = {
            SampleReg.SCRATCH: self.scratch,
            SampleReg.WRITE_COUNT: self.write_count,
            SampleReg.IRQ: int(self.pci.intx.asserted),
            SampleReg.LAST_WRITE: self.last_write,
            SampleReg.MAGIC: SAMPLE_MAGIC,
        }
        value = values.get(register, 0) >> (8 * (offset - register))
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, data: bytes) -> None:
        """BAR0 write handler."""
        value = int.from_bytes(data, "little")
        self.write_count += 1
        self.last_write = value
        self.writes.append((offset, value))
        if offset == SampleReg.SCRATCH:
            self.scratch = value
        elif offset == SampleReg.IRQ:
            if value:
                self.pci.intx.assert_level()
            else:
                self.pci.intx.deassert_level()

    def reset(self) -> None:
        """Reset callback: registers back to zero."""
        self.resets += 1
        self.scratch = 0
        self.last_write = 0

    def disconnected(self) -> None:
        """Disconnect callback."""
        self.disconnects += 1
