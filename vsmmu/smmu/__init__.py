"""The vSMMUv3 device model: registers, queues, stream table, GERROR, IRQ."""
