"""Emulated PCI endpoints whose DMA goes through the iommufd backend.

Public API:

* :mod:`vsmmu.endpoints.base` — :class:`Endpoint`, :class:`DmaPort`,
  :class:`EndpointError`, :class:`EndpointDmaError`;
* :func:`vsmmu.endpoints.registry.make_endpoint` — an endpoint from its ``--endpoint`` spec;
* :class:`~vsmmu.endpoints.virtio_pci.VirtioPciEndpoint` — the modern
  virtio-pci transport (INTx only, VERSION_1 + ACCESS_PLATFORM);
* :class:`~vsmmu.endpoints.virtio_rng.VirtioRng` with
  :func:`~vsmmu.endpoints.virtio_rng.expected_stream`;
* :class:`~vsmmu.endpoints.iommu_testdev.IommuTestdev` — QEMU's
  ``iommu-testdev`` register file (one DMA through the IOMMU per trigger);
* :class:`~vsmmu.endpoints.virtio_blk.VirtioBlk` — a block device over a raw image;
* :class:`~vsmmu.endpoints.identity.IdentityDmaPort` — no-IOMMU DMA, for
  tests of an endpoint alone.
"""

from vsmmu.endpoints.base import (
    DmaPort,
    Endpoint,
    EndpointDmaError,
    EndpointError,
    EndpointSpecError,
)
from vsmmu.endpoints.identity import IdentityDmaPort
from vsmmu.endpoints.iommu_testdev import IommuTestdev
from vsmmu.endpoints.registry import make_endpoint
from vsmmu.endpoints.virtio_blk import VirtioBlk
from vsmmu.endpoints.virtio_pci import VirtioPciEndpoint
from vsmmu.endpoints.virtio_rng import VirtioRng, expected_stream
from vsmmu.endpoints.virtqueue import VirtqueueError

__all__ = [
    "DmaPort",
    "Endpoint",
    "EndpointDmaError",
    "EndpointError",
    "EndpointSpecError",
    "IdentityDmaPort",
    "IommuTestdev",
    "VirtioBlk",
    "VirtioPciEndpoint",
    "VirtioRng",
    "VirtqueueError",
    "expected_stream",
    "make_endpoint",
]
