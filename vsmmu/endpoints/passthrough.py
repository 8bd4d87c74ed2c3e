"""A VFIO device passed through behind the vSMMU: ``--endpoint vfio=/dev/vfio/devices/vfioN``.

The host device is bound to the service's iommufd (its cdev,
:meth:`~vsmmu.iommufd.kernel.KernelIommufd.bind_vfio_cdev`), so the nesting
translator attaches it as the guest's STE says and its DMA goes through the
host SMMU: stage 1 from the guest's own tables, stage 2 the IOAS that mirrors
guest RAM.  No byte of its DMA passes through this process.

To QEMU it is a vfio-user PCI function that forwards, with no emulation of
its own:

* **config space** as VFIO presents it (VFIO already virtualizes BARs, MSI and
  MSI-X capabilities and the command register), read and written through the
  device's config region;
* **BARs** as VFIO's regions: REGION_INFO carries the cdev fd and the region's
  offset in it where VFIO allows mmap (QEMU then maps the BAR and never traps),
  with VFIO's sparse-mmap capability as is; trapped accesses are ``pread``/
  ``pwrite`` on the cdev;
* **interrupts**: the eventfds QEMU sends in SET_IRQS go straight into
  ``VFIO_DEVICE_SET_IRQS``, so the kernel signals QEMU directly (no Python on
  the interrupt path); masks, unmasks and triggers are forwarded too;
* **reset** to ``VFIO_DEVICE_RESET``.

The device stays bound while a client is connected; when the client goes
away its interrupts are torn down, it is reset, and it is unbound (the
service first takes it off the translator), so the host may bind it afresh;
the next client binds it again.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar, cast

from vsmmu.endpoints.base import Endpoint, EndpointError, EndpointSpecError
from vsmmu.iommufd import uapi_vfio as vfio
from vsmmu.iommufd.backend import IommufdBackend, IommufdError
from vsmmu.iommufd.kernel import KernelIommufd
from vsmmu.iommufd.vfio import RawIoctlFn, VfioDevice, VfioDeviceError, VfioIrq, VfioRegion
from vsmmu.vfio_user import (
    BarRegion,
    CommandError,
    DmaMapTable,
    IrqInfo,
    IrqSet,
    PciFunction,
    RegionInfo,
)
from vsmmu.vfio_user import uapi as pci

logger = logging.getLogger(__name__)

_FORWARDED_REGION_FLAGS = (
    vfio.RegionInfoFlags.READ | vfio.RegionInfoFlags.WRITE | vfio.RegionInfoFlags.MMAP
)
"""Region flags passed on to the client (CAPS is the session's to set)."""

DevIdListener = Callable[[int], object]
"""Told a dev_id (its result is ignored)."""


_T = TypeVar("_T")


def _present(query: Callable[[int], _T], index: int) -> _T | None:
    """``query(index)``, or None where vfio-pci says the index does not exist here.

    vfio-pci answers EINVAL for a region or interrupt index the device lacks
    (the VGA region of a device without VGA, the ERR interrupt of a
    conventional PCI device), as QEMU's vfio-pci expects.
    """
    try:
        return query(index)
    except VfioDeviceError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None


def _command_error(exc: VfioDeviceError) -> CommandError:
    return CommandError(exc.errno or errno.EIO, str(exc))


class VfioPciFunction(PciFunction):
    """The vfio-user face of one bound VFIO PCI device (module docstring).

    ``on_connect`` runs when a client connects (before its first request),
    ``on_disconnect`` after its interrupts are torn down and the device reset.
    """

    def __init__(self, name: str, on_connect: Callable[[], None],
                 on_disconnect: Callable[[], None]) -> None:
        self.name = name
        self.bars: dict[int, BarRegion] = {}
        # QEMU maps guest RAM into every function; the IOAS is fed from the SMMU
        # function's maps, so these only keep the protocol whole.
        self.dma = DmaMapTable()
        self._device: VfioDevice | None = None
        self._regions: dict[int, VfioRegion] = {}
        self._irqs: dict[int, VfioIrq] = {}
        self._can_reset = False
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect

    def use(self, device: VfioDevice) -> None:
        """Serve ``device``: read its regions and interrupt indices.

        Raises VfioDeviceError when VFIO refuses an ioctl, EndpointError when
        the device is not a PCI device.
        """
        info = device.info()
        if not info.flags & vfio.DeviceFlags.PCI:
            raise EndpointError(f"{self.name}: VFIO device flags {info.flags!r}: not a PCI "
                                "device (only vfio-pci devices can be passed through)")
        regions = {index: region for index in range(min(info.num_regions, pci.PCI_NUM_REGIONS))
                   if (region := _present(device.region, index)) is not None}
        irqs = {index: irq for index in range(min(info.num_irqs, pci.PCI_NUM_IRQS))
                if (irq := _present(device.irq, index)) is not None}
        self._device, self._regions, self._irqs = device, regions, irqs
        self._can_reset = bool(info.flags & vfio.DeviceFlags.RESET)
        self.bars = {
            index: BarRegion(region.size, functools.partial(self._bar_read, region),
                             functools.partial(self._bar_write, region))
            for index, region in regions.items()
            if index < pci.PCI_NUM_BARS and region.size
            and region.flags & vfio.RegionInfoFlags.READ
        }
        logger.info("%s: %d region(s) %s, IRQs %s, reset %s", self.name, len(self.bars),
                    {i: f"{r.size:#x}{' mmap' if r.flags & vfio.RegionInfoFlags.MMAP else ''}"
                     for i, r in regions.items() if r.size},
                    {i: q.count for i, q in irqs.items() if q.count},
                    "yes" if self._can_reset else "no")

    def release(self) -> None:
        """Stop serving the device (it is being unbound): every region reads as absent."""
        self._device = None
        self._regions = {}
        self._irqs = {}
        self.bars = {}

    @property
    def device(self) -> VfioDevice:
        """The VFIO device being served. Raises CommandError (ENODEV) while unbound."""
        if self._device is None:
            raise CommandError(errno.ENODEV, f"{self.name}: the VFIO device is not bound")
        return self._device

    # --- regions ---

    def _bar_read(self, region: VfioRegion, offset: int, size: int) -> bytes:
        try:
            return self.device.read(region, offset, size)
        except VfioDeviceError as exc:
            raise _command_error(exc) from None

    def _bar_write(self, region: VfioRegion, offset: int, data: bytes) -> None:
        try:
            self.device.write(region, offset, data)
        except VfioDeviceError as exc:
            raise _command_error(exc) from None

    def region_info(self, index: int) -> RegionInfo:
        """VFIO's size and flags; the cdev fd and region offset where VFIO allows mmap."""
        region = self._regions.get(index)
        if region is None or not region.size:
            return RegionInfo(0, 0)
        flags = region.flags & _FORWARDED_REGION_FLAGS
        if index == pci.PciRegion.CONFIG or not flags & vfio.RegionInfoFlags.MMAP:
            return RegionInfo(region.size, int(flags & ~vfio.RegionInfoFlags.MMAP))
        return RegionInfo(region.size, int(flags), region.offset, self.device.fd, region.caps)

    def config_read(self, offset: int, size: int) -> bytes:
        """Through VFIO's config region (VFIO virtualizes what it must)."""
        return self._bar_read(self._config_region(), offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Through VFIO's config region."""
        self._bar_write(self._config_region(), offset, data)

    def _config_region(self) -> VfioRegion:
        region = self._regions.get(pci.PciRegion.CONFIG)
        if region is None:
            raise CommandError(errno.ENODEV, f"{self.name}: no config region")
        return region

    # --- interrupts ---

    def irq_info(self, index: int) -> IrqInfo:
        """VFIO's flags and vector count for ``index`` (absent: no vectors)."""
        irq = self._irqs.get(index)
        return IrqInfo(int(irq.flags), irq.count) if irq is not None else IrqInfo(0, 0)

    def set_irqs(self, request: IrqSet) -> None:
        """Forward to ``VFIO_DEVICE_SET_IRQS``; eventfds are handed over as they came."""
        device = self.device
        try:
            if request.data_type == pci.IRQ_SET_DATA_EVENTFD:
                if request.action != pci.IRQ_SET_ACTION_TRIGGER:
                    raise CommandError(errno.EINVAL,
                                       "SET_IRQS DATA_EVENTFD: only with ACTION_TRIGGER")
                fds: list[int | None] = list(request.fds) or [None] * request.count
                device.set_irq_eventfds(request.index, request.start, fds)
            else:
                flags = vfio.IrqSetFlags(request.data_type | request.action)
                device.set_irqs(request.index, flags, request.start, request.count,
                                request.bools)
        except VfioDeviceError as exc:
            raise _command_error(exc) from None

    # --- reset and the client's life ---

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``. Raises CommandError (ENOTTY) when VFIO cannot reset it."""
        if not self._can_reset:
            raise CommandError(errno.ENOTTY, f"{self.name}: VFIO reports no reset method")
        try:
            self.device.reset()
        except VfioDeviceError as exc:
            raise _command_error(exc) from None

    def attach_client(self) -> None:
        """Bind the device if a previous client's departure unbound it."""
        self._on_connect()

    def detach_client(self) -> None:
        """Interrupts off, device reset, guest RAM maps dropped; then the owner unbinds it."""
        device = self._device
        if device is not None:
            for index, irq in self._irqs.items():
                if irq.count:
                    try:
                        device.disable_irqs(index)
                    except VfioDeviceError as exc:
                        logger.warning("%s: IRQ index %d not torn down: %s", self.name, index,
                                       exc)
            if self._can_reset:
                try:
                    device.reset()
                except VfioDeviceError as exc:
                    logger.warning("%s: reset after disconnect failed: %s", self.name, exc)
        self.dma.unmap_all()
        self._on_disconnect()


class VfioPassthrough(Endpoint):
    """A host VFIO PCI device behind the vSMMU (module docstring).

    Built from ``vfio=PATH[,name=NAME]`` by :func:`from_options`; the service
    calls :meth:`bind` with the kernel backend and the listeners that add the
    device to (``on_bound``) and remove it from (``on_unbinding``) the
    translator while it is bound.
    """

    KIND = "vfio"

    def __init__(self, path: str, name: str | None = None) -> None:
        super().__init__(name or os.path.basename(path))
        self.path = path
        self.dev_id: int | None = None
        self._backend: KernelIommufd | None = None
        self._on_bound: DevIdListener | None = None
        self._on_unbinding: DevIdListener | None = None
        self.pci: VfioPciFunction = VfioPciFunction(self.name, self._client_connected,
                                                    self._client_gone)

    @classmethod
    def from_options(cls, spec: str, path: str, options: dict[str, str]) -> VfioPassthrough:
        """``vfio=PATH[,name=NAME]``. Raises EndpointSpecError on another option."""
        unknown = sorted(set(options) - {"name"})
        if unknown or not path:
            raise EndpointSpecError(f"endpoint spec {spec!r}: expected vfio=PATH[,name=NAME]"
                                    + (f", not {unknown}" if unknown else ""))
        return cls(path, options.get("name"))

    def bind(self, backend: IommufdBackend, *, on_bound: DevIdListener,
             on_unbinding: DevIdListener) -> int:
        """Bind the device to ``backend`` (the kernel's) and serve it; return its dev_id.

        ``on_bound`` is not called for this first bind (the caller has the
        dev_id); it is for a rebind when a new client connects.  Raises
        EndpointError with what is wrong: not the kernel backend, not a VFIO
        cdev, VFIO refusing the bind or an ioctl.
        """
        if not isinstance(backend, KernelIommufd):
            raise EndpointError(f"{self.name}: vfio={self.path} needs --backend kernel (the "
                                f"{backend.name} backend cannot bind a real device)")
        self._backend = backend
        self._on_bound, self._on_unbinding = on_bound, on_unbinding
        return self._bind()

    def _bind(self) -> int:
        backend = self._backend
        assert backend is not None
        try:
            dev_id = backend.bind_vfio_cdev(self.path)
        except IommufdError as exc:
            raise EndpointError(f"{self.name}: cannot bind {self.path} to iommufd: {exc}"
                                " (a VFIO cdev, /dev/vfio/devices/vfioN, of a device bound "
                                "to vfio-pci and not open elsewhere?)") from None
        try:
            raw_ioctl = cast(RawIoctlFn, backend.ioctl_function)
            self.pci.use(VfioDevice(backend.cdev_fd(dev_id), self.name, ioctl_fn=raw_ioctl))
        except (VfioDeviceError, EndpointError) as exc:
            backend.unbind_vfio_cdev(dev_id)
            raise EndpointError(f"{self.name}: {self.path}: {exc}") from None
        self.dev_id = dev_id
        logger.info("%s: %s bound to iommufd as device %d", self.name, self.path, dev_id)
        return dev_id

    def _client_connected(self) -> None:
        if self.dev_id is not None or self._backend is None:
            return
        dev_id = self._bind()
        if self._on_bound is not None:
            self._on_bound(dev_id)

    def _client_gone(self) -> None:
        dev_id, backend = self.dev_id, self._backend
        if dev_id is None or backend is None:
            return
        if self._on_unbinding is not None:
            self._on_unbinding(dev_id)
        self.pci.release()
        try:
            backend.unbind_vfio_cdev(dev_id)
        except IommufdError as exc:
            logger.error("%s: unbind of device %d failed: %s", self.name, dev_id, exc)
        self.dev_id = None
        logger.info("%s: client gone: %s unbound (free for a fresh bind)", self.name, self.path)

    def reset(self) -> None:
        """Device reset through VFIO (when VFIO offers one)."""
        try:
            self.pci.reset()
        except CommandError as exc:
            logger.warning("%s: %s", self.name, exc)
