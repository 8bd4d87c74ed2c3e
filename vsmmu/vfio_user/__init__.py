"""vfio-user server: transport, protocol and the device-facing API."""
