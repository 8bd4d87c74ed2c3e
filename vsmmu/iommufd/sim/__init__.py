"""The embedded iommufd backend: a model of the host kernel and its physical SMMU.

* :mod:`.objects`: the iommufd objects (IOAS, HWPTs, vIOMMU, vDEVICE, vEVENTQ);
* :mod:`.backend`: :class:`SimIommufd`, the typed backend over them;
* :mod:`.ioctl`: the raw ``/dev/iommu`` ioctl decoder onto the typed backend;
* :mod:`.physical_smmu` and :mod:`.iotlb`: the physical SMMU that translates
  the DMA of emulated endpoints and reports its faults.
"""

from vsmmu.iommufd.sim.backend import SimIommufd
from vsmmu.iommufd.sim.host import QEMU_SMMUV3, HostPersonality, validate_vste
from vsmmu.iommufd.sim.iotlb import TLB_PAGE_SHIFT, TLB_PAGE_SIZE, Iotlb, TlbEntry
from vsmmu.iommufd.sim.objects import (
    IoasMap,
    SimDevice,
    SimHwptNested,
    SimHwptPaging,
    SimIoas,
    SimObject,
    SimVdevice,
    SimVeventq,
    SimViommu,
)
from vsmmu.iommufd.sim.physical_smmu import ALLOWED_INVALIDATIONS, PhysicalSmmu

__all__ = [
    "ALLOWED_INVALIDATIONS",
    "QEMU_SMMUV3",
    "TLB_PAGE_SHIFT",
    "TLB_PAGE_SIZE",
    "HostPersonality",
    "IoasMap",
    "Iotlb",
    "PhysicalSmmu",
    "SimDevice",
    "SimHwptNested",
    "SimHwptPaging",
    "SimIoas",
    "SimIommufd",
    "SimObject",
    "SimVdevice",
    "SimVeventq",
    "SimViommu",
    "TlbEntry",
    "validate_vste",
]
