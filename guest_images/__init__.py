"""Guest kernel and initramfs built from Debian packages."""
