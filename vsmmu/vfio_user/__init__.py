"""vfio-user server: transport, protocol and the device-facing API.

Public API (a device never sees a message):

* :class:`~vsmmu.vfio_user.device.PciDevice`, :class:`~vsmmu.vfio_user.device.BarRegion`,
  :class:`~vsmmu.vfio_user.device.IrqVector` — what a device model registers and calls;
* :class:`~vsmmu.vfio_user.device.PciFunction` with :class:`~vsmmu.vfio_user.device.RegionInfo`,
  :class:`~vsmmu.vfio_user.device.IrqInfo`, :class:`~vsmmu.vfio_user.device.IrqSet` — what
  a function forwarded from elsewhere (VFIO passthrough) implements instead;
* :class:`~vsmmu.vfio_user.pci.PciIdentity`, :class:`~vsmmu.vfio_user.pci.MsixLayout`,
  :class:`~vsmmu.vfio_user.pci.PciCapability` (device-supplied standard/extended caps);
* :class:`~vsmmu.vfio_user.dma.DmaMapTable` / :class:`~vsmmu.vfio_user.dma.DmaMapping`;
* :class:`~vsmmu.vfio_user.server.VfioUserServer` — serves one device on one socket;
* :class:`~vsmmu.vfio_user.client.VfioUserClient` — a Python client for tests and tools.
"""

from vsmmu.vfio_user.device import (
    BarRegion,
    IrqInfo,
    IrqSet,
    IrqVector,
    PciDevice,
    PciFunction,
    RegionInfo,
)
from vsmmu.vfio_user.dma import DmaError, DmaMapping, DmaMapTable
from vsmmu.vfio_user.messages import CommandError, ProtocolError, VfioUserError
from vsmmu.vfio_user.pci import MsixLayout, PciCapability, PciConfigError, PciIdentity
from vsmmu.vfio_user.server import ServerError, VfioUserServer

__all__ = [
    "BarRegion",
    "CommandError",
    "DmaError",
    "DmaMapTable",
    "DmaMapping",
    "IrqInfo",
    "IrqSet",
    "IrqVector",
    "MsixLayout",
    "PciCapability",
    "PciConfigError",
    "PciDevice",
    "PciFunction",
    "PciIdentity",
    "ProtocolError",
    "RegionInfo",
    "ServerError",
    "VfioUserError",
    "VfioUserServer",
]
