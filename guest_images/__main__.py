"""``python -m guest_images --cache .cache [--suite trixie]``: provision the guest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guest_images.debian import DebianArchiveError
from guest_images.initramfs import build_initramfs
from guest_images.kernel import DEFAULT_SUITE, GuestImageError, ensure_guest


def main(argv: list[str] | None = None) -> int:
    """Provision the guest kernel and busybox, build the plain initramfs, print paths."""
    parser = argparse.ArgumentParser(prog="guest_images", description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite of the kernel")
    args = parser.parse_args(argv)
    try:
        guest = ensure_guest(args.cache, args.suite)
        initramfs = build_initramfs(guest, Path(args.cache).resolve() / "initramfs")
    except (GuestImageError, DebianArchiveError) as exc:
        print(f"guest_images: {exc}", file=sys.stderr)
        return 1
    print(f"guest kernel {guest.release}: {guest.image}")
    print(f"initramfs: {initramfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
