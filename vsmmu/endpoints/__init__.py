"""Emulated PCI endpoints whose DMA goes through the iommufd backend."""
