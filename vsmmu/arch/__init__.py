"""SMMUv3 architecture as data: registers, STE/CD, commands, events, page tables."""
