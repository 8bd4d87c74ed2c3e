"""vsmmu: a virtual ARM SMMUv3 served over vfio-user, nested through iommufd."""
