"""The guest kernel and userland: Debian's arm64 kernel and busybox-static.

``ensure_guest(cache, suite)`` downloads ``linux-image-<release>-arm64`` (and
``linux-modules-<release>-arm64`` where the suite splits modules out) plus
``busybox-static`` for arm64, unpacks them under ``<cache>/guest/<suite>/``
and records the result in ``manifest.json`` there.  A second call reads the
manifest and touches no network.

Suites: ``trixie`` (the default, Linux 6.12), ``trixie-backports`` (the
newer kernel the e2e matrix also boots, 7.3.x at the time of writing; its
busybox comes from ``trixie``, since a backports suite carries only the
packages backported to it) and ``sid``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from guest_images.debian import DebianArchive, unpack_packages
from guest_images.modules import ModuleTree

log = logging.getLogger(__name__)

GUEST_ARCH = "arm64"
DEFAULT_SUITE = "trixie"
KERNEL_META = "linux-image-arm64"
BUSYBOX_PACKAGE = "busybox-static"
MANIFEST_VERSION = 1
NEWER_SUITE = "trixie-backports"
"""The second guest kernel of the e2e matrix: newer driver, decodes event names."""
BACKPORTS_SUFFIX = "-backports"


class GuestImageError(RuntimeError):
    """The guest kernel or userland could not be provisioned or built."""


@dataclass(frozen=True)
class GuestKernel:
    """A provisioned guest: kernel Image, its modules and a static busybox."""

    suite: str
    release: str
    """The kernel release, exactly what ``uname -r`` prints in the guest."""
    kernel_root: Path
    busybox_root: Path
    packages: dict[str, str]

    @property
    def image(self) -> Path:
        """The raw ARM64 ``Image`` QEMU boots with ``-kernel``."""
        for candidate in (
            self.kernel_root / "boot" / f"vmlinuz-{self.release}",
            self.modules_dir / "vmlinuz",
        ):
            if candidate.exists():
                return candidate
        return self.kernel_root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        """``/usr/lib/modules/<release>`` of the unpacked kernel packages."""
        return self.kernel_root / "usr/lib/modules" / self.release

    @property
    def busybox(self) -> Path:
        """The static arm64 busybox binary."""
        for candidate in ("usr/bin/busybox", "bin/busybox"):
            path = self.busybox_root / candidate
            if path.exists():
                return path
        raise GuestImageError(f"no busybox binary under {self.busybox_root}")

    def module_tree(self) -> ModuleTree:
        """The module index of this kernel."""
        return ModuleTree(self.modules_dir)


def userland_suite(suite: str) -> str:
    """The suite busybox is taken from: a backports suite's base suite, else ``suite``."""
    return suite.removesuffix(BACKPORTS_SUFFIX)


def _guest_dir(cache: Path, suite: str) -> Path:
    return Path(cache).resolve() / "guest" / suite


def load_guest(cache: Path, suite: str = DEFAULT_SUITE) -> GuestKernel | None:
    """Return the guest recorded in the cache for ``suite``, or None."""
    manifest = _guest_dir(cache, suite) / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        if data.get("manifest_version") != MANIFEST_VERSION:
            return None
        guest = GuestKernel(
            suite=suite,
            release=str(data["release"]),
            kernel_root=_guest_dir(cache, suite) / "kernel",
            busybox_root=_guest_dir(cache, suite) / "busybox",
            packages={str(k): str(v) for k, v in data["packages"].items()},
        )
    except (ValueError, KeyError, AttributeError):
        return None
    if not guest.image.exists() or not guest.modules_dir.is_dir():
        return None
    return guest


def ensure_guest(cache: Path, suite: str = DEFAULT_SUITE, *, quiet: bool = False) -> GuestKernel:
    """Return the guest kernel for ``suite``, downloading and unpacking it if needed.

    Raises GuestImageError if the suite has no arm64 kernel image.
    """
    guest = load_guest(cache, suite)
    if guest is not None:
        if not quiet:
            print(f"==> guest kernel {guest.release} ({suite}) already in {guest.kernel_root}",
                  file=sys.stderr)
        return guest
    archive = DebianArchive(Path(cache))
    closure = archive.resolve([KERNEL_META], arch=GUEST_ARCH, suite=suite, with_dependencies=True)
    images = [n for n, _, _ in closure if re.fullmatch(r"linux-image-\d.*-arm64", n)]
    if len(images) != 1:
        raise GuestImageError(
            f"{KERNEL_META} in {suite} resolved to kernel images {images}, expected exactly one"
        )
    release = images[0].removeprefix("linux-image-")
    # trixie ships Image and modules in linux-image-<release>; newer kernels
    # split them into linux-binary-<release> and linux-modules-<release>.
    kernel_names = [
        n for n, _, _ in closure
        if re.fullmatch(rf"linux-(image|binary|modules)-{re.escape(release)}", n)
    ]
    print(f"==> guest kernel {release} from {suite}", file=sys.stderr, flush=True)
    kernel_pkgs = archive.fetch(kernel_names, arch=GUEST_ARCH, suite=suite)
    busybox_pkgs = archive.fetch([BUSYBOX_PACKAGE], arch=GUEST_ARCH, suite=userland_suite(suite))
    root = _guest_dir(cache, suite)
    unpack_packages(kernel_pkgs, root / "kernel")
    unpack_packages(busybox_pkgs, root / "busybox")
    guest = GuestKernel(
        suite=suite,
        release=release,
        kernel_root=root / "kernel",
        busybox_root=root / "busybox",
        packages={p.name: p.version for p in [*kernel_pkgs, *busybox_pkgs]},
    )
    if not guest.image.exists():
        raise GuestImageError(f"kernel package for {release} has no {guest.image}")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "suite": suite,
        "release": release,
        "packages": dict(sorted(guest.packages.items())),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name, version in sorted(guest.packages.items()):
        print(f"    {name} {version}", file=sys.stderr)
    return guest
