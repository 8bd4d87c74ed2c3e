"""Shared pytest configuration: the harness fixtures (guest_env, boot_machine, nested_machine)."""

pytest_plugins = ["qmp_harness.fixtures", "qmp_harness.nested_fixtures"]
