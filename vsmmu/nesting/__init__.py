"""The nesting translator: vSMMU configuration in, iommufd requests out."""
