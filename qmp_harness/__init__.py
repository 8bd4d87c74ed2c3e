"""QEMU launch, guest device tree, QMP, console and pytest fixtures."""
