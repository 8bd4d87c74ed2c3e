"""iommufd: uAPI, backend interface, simulated and kernel backends."""
