"""Reliability tooling: hostile-client probes, the service under test, and the soak."""
