"""The service QMP monitor."""
