"""Shared pytest configuration: the harness fixtures (guest_env, boot_machine, ...)."""

pytest_plugins = ["qmp_harness.fixtures"]
