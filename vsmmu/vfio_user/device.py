"""The device-facing API: what a device model registers, and what it may call.

A device describes itself with a :class:`PciDevice`: identity, BARs with
synchronous read/write handlers, interrupt vectors, reset and disconnect
callbacks.  It raises interrupts through :class:`IrqVector` and reaches guest
memory through :attr:`PciDevice.dma`.  It never sees a vfio-user message.

:class:`PciFunction` is what the protocol layer asks of any function it
serves; :class:`PciDevice` answers it for a device emulated here, and a
function forwarded from elsewhere (a VFIO device passed through) answers it
with what that device reports.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import logging
import os
from collections.abc import Callable, Sequence

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.dma import DmaMapTable
from vsmmu.vfio_user.messages import CommandError
from vsmmu.vfio_user.pci import (
    BarLayout,
    MsixLayout,
    PciCapability,
    PciConfigSpace,
    PciIdentity,
)

logger = logging.getLogger(__name__)

#: ``read(offset, size)`` returns an int (little-endian, ``size`` bytes) or bytes.
ReadHandler = Callable[[int, int], "int | bytes"]
#: ``write(offset, data)``.
WriteHandler = Callable[[int, bytes], None]

_EVENTFD_INCREMENT = (1).to_bytes(8, "little")


@dataclasses.dataclass
class BarRegion:
    """A memory BAR served by synchronous handlers (offsets relative to the BAR)."""

    size: int
    read: ReadHandler
    write: WriteHandler
    is_64bit: bool = False
    prefetchable: bool = False

    def layout(self) -> BarLayout:
        """How the BAR shows in config space."""
        return BarLayout(self.size, self.is_64bit, self.prefetchable)


class IrqVector:
    """One interrupt vector (the INTx line, or one MSI/MSI-X vector).

    The client assigns an eventfd; :meth:`trigger` signals it.  The fd is the
    client's and may be anything (a pipe nobody reads), so it is switched to
    non-blocking when assigned and a write that would block is taken as
    delivered: the fd is already readable, so the reader still sees an
    interrupt (a full eventfd counter or pipe coalesces triggers, as an
    eventfd does).  A masked
    vector remembers a trigger as pending and delivers it on unmask.  INTx is
    automasked, as in VFIO: each delivery masks it until the client unmasks
    (QEMU does so when the guest next touches the device), and a level that
    is still asserted at unmask is delivered again.
    """

    def __init__(self, name: str, automasked: bool) -> None:
        self.name = name
        self.automasked = automasked
        self.eventfd: int | None = None
        self.masked = False
        self.pending = False
        self.asserted = False
        self.delivered = 0
        #: Triggers folded into one the reader has not consumed yet (fd full).
        self.coalesced = 0

    def trigger(self) -> bool:
        """Raise the interrupt once; False when it was held back (masked, no eventfd)."""
        if self.eventfd is None or self.masked:
            self.pending = True
            return False
        try:
            os.write(self.eventfd, _EVENTFD_INCREMENT)
        except BlockingIOError:
            self.coalesced += 1
        except OSError as exc:
            logger.warning("irq %s: eventfd %d write failed: %s", self.name, self.eventfd, exc)
            self.pending = True
            return False
        self.pending = False
        self.delivered += 1
        if self.automasked:
            self.masked = True
        return True

    def assert_level(self) -> None:
        """Level-triggered: assert, delivering now or at the next unmask."""
        self.asserted = True
        self.trigger()

    def deassert_level(self) -> None:
        """Level-triggered: de-assert; nothing pending stays."""
        self.asserted = False
        self.pending = False

    def mask(self) -> None:
        """Hold back deliveries."""
        self.masked = True

    def unmask(self) -> None:
        """Allow deliveries; re-deliver a pending trigger or a still-asserted level."""
        self.masked = False
        if self.pending or self.asserted:
            self.trigger()

    def assign(self, eventfd: int | None) -> None:
        """Take ownership of ``eventfd`` (None de-assigns); the previous one is closed.

        The new fd is made non-blocking (:meth:`trigger` must never wait).
        """
        if eventfd is not None:
            try:
                os.set_blocking(eventfd, False)
            except OSError as exc:
                logger.warning("irq %s: fd %d cannot be made non-blocking (%s); not used",
                               self.name, eventfd, exc)
                with contextlib.suppress(OSError):
                    os.close(eventfd)
                eventfd = None
        if self.eventfd is not None:
            os.close(self.eventfd)
        self.eventfd = eventfd
        if eventfd is not None and (self.pending or self.asserted) and not self.masked:
            self.trigger()

    def release(self) -> None:
        """Forget the client's state: close the eventfd, unmask, clear pending."""
        self.assign(None)
        self.masked = False
        self.pending = False


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """What DEVICE_GET_REGION_INFO answers for one region.

    ``flags`` are ``REGION_INFO_FLAG_*``.  A region the client may mmap
    comes with ``fd`` (lent: the function keeps it open while it serves)
    and the region's ``offset`` in it.  ``caps`` is a VFIO capability chain
    (e.g. sparse mmap areas) as it follows the fixed reply, its ``next``
    offsets counted from the start of the reply's ``argsz``.
    """

    size: int
    flags: int
    offset: int = 0
    fd: int | None = None
    caps: bytes = b""


@dataclasses.dataclass(frozen=True)
class IrqInfo:
    """What DEVICE_GET_IRQ_INFO answers for one interrupt index."""

    flags: int
    count: int


@dataclasses.dataclass
class IrqSet:
    """One validated DEVICE_SET_IRQS: ``count`` vectors from ``start`` of ``index``.

    ``data_type`` and ``action`` are single ``IRQ_SET_*`` bits.  ``fds`` are
    the eventfds that came with a DATA_EVENTFD request (empty: de-assign);
    the function takes ownership of them.  ``bools`` holds DATA_BOOL's bytes.
    """

    index: int
    data_type: int
    action: int
    start: int
    count: int
    fds: list[int] = dataclasses.field(default_factory=list)
    bools: bytes = b""


class PciFunction(abc.ABC):
    """What the protocol layer serves: a PCI function's regions, interrupts and reset.

    Implementations: :class:`PciDevice` (a device model in this process) and
    forwarded functions such as a VFIO device passed through.  Every method
    may raise :class:`~vsmmu.vfio_user.messages.CommandError`, which becomes
    the client's error reply.
    """

    #: Memory BARs by index, served on the register fast path.
    bars: dict[int, BarRegion]
    #: Guest memory the client mapped for this function's DMA.
    dma: DmaMapTable

    @abc.abstractmethod
    def region_info(self, index: int) -> RegionInfo:
        """Region ``index`` (a BAR, ROM, config space or VGA); size 0 when absent."""

    def region_size(self, index: int) -> int:
        """Size of VFIO region ``index`` (0 when absent)."""
        return self.region_info(index).size

    @abc.abstractmethod
    def irq_info(self, index: int) -> IrqInfo:
        """Interrupt index ``index``: how it is signalled and how many vectors it has."""

    @abc.abstractmethod
    def set_irqs(self, request: IrqSet) -> None:
        """Apply a SET_IRQS the protocol layer has validated against :meth:`irq_info`."""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of configuration space at ``offset`` (bounds already checked)."""

    @abc.abstractmethod
    def config_write(self, offset: int, data: bytes) -> None:
        """A configuration-space write (bounds already checked)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Function reset (DEVICE_RESET)."""

    def attach_client(self) -> None:  # noqa: B027 - optional hook
        """A client connected: take what serving it needs (emulated functions need nothing).

        Raising refuses the client: its connection is closed.
        """

    @abc.abstractmethod
    def detach_client(self) -> None:
        """The client went away: release everything it set up."""


class PciDevice(PciFunction):
    """A PCI function as a device model sees it.

    ``bars`` maps BAR index to region; ``intx`` gives the function an INTA
    pin; ``msi_vectors``/``msix_vectors`` size those IRQ indices (``msix``
    also emits an MSI-X capability pointing into one of the BARs, whose
    handlers must then serve the PBA).  ``capabilities`` are appended to the
    standard list after PCIe (and MSI-X); ``ext_capabilities`` form the
    extended list at 0x100 (see :class:`~vsmmu.vfio_user.pci.PciCapability`).
    ``on_reset`` runs on DEVICE_RESET and on disconnect; ``on_disconnect``
    runs when the client goes away.
    """

    def __init__(
        self,
        identity: PciIdentity,
        bars: dict[int, BarRegion],
        *,
        intx: bool = True,
        msi_vectors: int = 0,
        msix: MsixLayout | None = None,
        pcie_type: int = uapi.PCI_EXP_TYPE_ENDPOINT,
        on_reset: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        dma: DmaMapTable | None = None,
        capabilities: Sequence[PciCapability] = (),
        ext_capabilities: Sequence[PciCapability] = (),
    ) -> None:
        self.identity = identity
        self.bars = dict(bars)
        self.config = PciConfigSpace(
            identity,
            {index: bar.layout() for index, bar in self.bars.items()},
            intx=intx,
            msix=msix,
            pcie_type=pcie_type,
            capabilities=capabilities,
            ext_capabilities=ext_capabilities,
        )
        self.irqs: dict[int, list[IrqVector]] = {
            uapi.PciIrq.INTX: [IrqVector("intx", automasked=True)] if intx else [],
            uapi.PciIrq.MSI: [IrqVector(f"msi{n}", False) for n in range(msi_vectors)],
            uapi.PciIrq.MSIX: [
                IrqVector(f"msix{n}", False) for n in range(msix.vectors if msix else 0)
            ],
            uapi.PciIrq.ERR: [],
            uapi.PciIrq.REQ: [],
        }
        self.on_reset = on_reset
        self.on_disconnect = on_disconnect
        self.dma = dma if dma is not None else DmaMapTable()

    @property
    def intx(self) -> IrqVector:
        """The INTx line.

        :raises LookupError: the device was declared without INTx.
        """
        vectors = self.irqs[uapi.PciIrq.INTX]
        if not vectors:
            raise LookupError("PCI device has no INTx line")
        return vectors[0]

    def region_size(self, index: int) -> int:
        """Size of VFIO region ``index`` (0 when absent)."""
        if index == uapi.PciRegion.CONFIG:
            return self.config.size
        bar = self.bars.get(index)
        return bar.size if bar is not None else 0

    def region_info(self, index: int) -> RegionInfo:
        """Readable and writable when present; nothing is mmap-able (every access traps)."""
        size = self.region_size(index)
        flags = uapi.REGION_INFO_FLAG_READ | uapi.REGION_INFO_FLAG_WRITE if size else 0
        return RegionInfo(size, flags)

    def irq_info(self, index: int) -> IrqInfo:
        """Eventfd-signalled and maskable; INTx automasked, MSI/MSI-X fixed in size."""
        flags = uapi.IRQ_INFO_EVENTFD | uapi.IRQ_INFO_MASKABLE
        if index == uapi.PciIrq.INTX:
            flags |= uapi.IRQ_INFO_AUTOMASKED
        else:
            flags |= uapi.IRQ_INFO_NORESIZE
        return IrqInfo(flags, len(self.irqs[index]))

    def set_irqs(self, request: IrqSet) -> None:
        """Assign eventfds to, mask, unmask or trigger the chosen interrupt vectors."""
        vectors = self.irqs[request.index]
        chosen = vectors[request.start : request.start + request.count]
        action = request.action
        if request.data_type == uapi.IRQ_SET_DATA_EVENTFD:
            if action != uapi.IRQ_SET_ACTION_TRIGGER:
                raise CommandError(errno.EINVAL, "SET_IRQS DATA_EVENTFD: only with ACTION_TRIGGER")
            fds: list[int | None] = list(request.fds) or [None] * len(chosen)
            request.fds = []
            for vector, fd in zip(chosen, fds, strict=True):
                vector.assign(fd)
        elif request.data_type == uapi.IRQ_SET_DATA_BOOL:
            _apply(action, [v for v, on in zip(chosen, request.bools, strict=True) if on])
        elif action == uapi.IRQ_SET_ACTION_TRIGGER and request.count == 0:
            for vector in vectors:
                vector.release()
        else:
            _apply(action, chosen)

    def config_read(self, offset: int, size: int) -> bytes:
        """From the synthesized configuration space."""
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Into the synthesized configuration space (writable bits only)."""
        self.config.write(offset, data)

    def reset(self) -> None:
        """Function reset: config space to power-on values, then the device's callback."""
        self.config.reset()
        for vectors in self.irqs.values():
            for vector in vectors:
                vector.deassert_level()
        if self.on_reset is not None:
            self.on_reset()

    def detach_client(self) -> None:
        """Tear down everything the client set up (eventfds, DMA maps), then notify."""
        for vectors in self.irqs.values():
            for vector in vectors:
                vector.release()
        self.dma.unmap_all()
        self.config.reset()
        if self.on_disconnect is not None:
            self.on_disconnect()


def _apply(action: int, vectors: list[IrqVector]) -> None:
    for vector in vectors:
        if action == uapi.IRQ_SET_ACTION_MASK:
            vector.mask()
        elif action == uapi.IRQ_SET_ACTION_UNMASK:
            vector.unmask()
        else:
            vector.trigger()
