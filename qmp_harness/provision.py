"""QEMU 11.1 from Debian packages, unpacked into a private prefix in the cache.

``ensure_qemu(cache)`` resolves ``qemu-system-arm`` (which carries
``qemu-system-aarch64``) from trixie-backports, falling back to sid, downloads
it with its library closure through the private apt root of
:mod:`guest_images.debian`, unpacks everything into ``<cache>/qemu/prefix``
and writes ``<cache>/qemu/manifest.json`` with the resolved versions.  When
the manifest and the binary are present nothing is resolved or downloaded.

The prefix is not installed anywhere: QEMU is started through the prefix's
own dynamic loader with ``--library-path`` so that the trixie libraries are
used on this Debian 12 host, and with ``-L <prefix>/usr/share/qemu`` because
QEMU's idea of its own location is the loader's.

Run as ``python -m qmp_harness.provision [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import DebianArchive, DebianArchiveError, unpack_packages

log = logging.getLogger(__name__)

QEMU_PACKAGE = "qemu-system-arm"
QEMU_SUITES = ("trixie-backports", "sid")
QEMU_MAJOR_MINOR = (11, 1)
HOST_ARCH = "amd64"
HOST_TRIPLET = "x86_64-linux-gnu"
LOADER_NAME = "ld-linux-x86-64.so.2"
MANIFEST_VERSION = 1


class ProvisionError(RuntimeError):
    """QEMU could not be provisioned or does not run."""


@dataclass(frozen=True)
class QemuInstall:
    """A QEMU unpacked into a private prefix."""

    prefix: Path
    version: str
    """``qemu-system-aarch64 --version`` first line's version, e.g. ``11.1.3``."""
    suite: str
    packages: dict[str, str]
    """Every unpacked package name mapped to its Debian version."""

    @property
    def binary(self) -> Path:
        """The ``qemu-system-aarch64`` ELF file (not directly executable on this host)."""
        return self.prefix / "usr/bin/qemu-system-aarch64"

    @property
    def loader(self) -> Path:
        """The prefix's own dynamic loader."""
        for candidate in (
            self.prefix / "usr/lib" / HOST_TRIPLET / LOADER_NAME,
            self.prefix / "lib" / HOST_TRIPLET / LOADER_NAME,
            self.prefix / "usr/lib64" / LOADER_NAME,
        ):
            if candidate.exists():
                return candidate
        raise ProvisionError(f"no {LOADER_NAME} under {self.prefix}, expected libc6's loader")

    @property
    def library_path(self) -> str:
        """The ``--library-path`` value for the loader."""
        dirs = [
            self.prefix / "usr/lib" / HOST_TRIPLET,
            self.prefix / "lib" / HOST_TRIPLET,
            self.prefix / "usr/lib" / HOST_TRIPLET / "pulseaudio",
        ]
        return ":".join(str(d) for d in dirs if d.is_dir())

    @property
    def data_dir(self) -> Path:
        """QEMU's firmware/data directory, passed as ``-L``."""
        return self.prefix / "usr/share/qemu"

    @property
    def module_dir(self) -> Path:
        """Where QEMU's loadable modules live (exported as QEMU_MODULE_DIR)."""
        return self.prefix / "usr/lib" / HOST_TRIPLET / "qemu"

    def argv(self) -> list[str]:
        """The argv prefix that starts ``qemu-system-aarch64`` (append QEMU options)."""
        return [
            str(self.loader),
            "--library-path",
            self.library_path,
            str(self.binary),
            "-L",
            str(self.data_dir),
        ]

    def env(self) -> dict[str, str]:
        """The environment to start QEMU in (the caller's plus QEMU_MODULE_DIR)."""
        env = dict(os.environ)
        env["QEMU_MODULE_DIR"] = str(self.module_dir)
        return env

    def run(self, *args: str, timeout: float = 30.0) -> str:
        """Run QEMU with ``args`` to completion and return its stdout.

        Raises ProvisionError if it fails or times out.
        """
        argv = [*self.argv(), *args]
        try:
            proc = subprocess.run(
                argv, env=self.env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{' '.join(argv)} did not finish in {timeout}s") from exc
        if proc.returncode != 0:
            raise ProvisionError(
                f"{' '.join(argv)} exited with {proc.returncode}, expected 0: "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def device_help(self) -> str:
        """``-device help`` output: every device type this QEMU offers."""
        return self.run("-machine", "none", "-device", "help")

    def object_help(self) -> str:
        """``-object help`` output: every user-creatable object type."""
        return self.run("-machine", "none", "-object", "help")


def _manifest_path(cache: Path) -> Path:
    return cache / "qemu" / "manifest.json"


def _parse_version(text: str) -> str:
    match = re.search(r"QEMU emulator version (\d+\.\d+\.\d+)", text)
    if match is None:
        raise ProvisionError(f"unexpected QEMU --version output {text[:200]!r}")
    return match.group(1)


def load_install(cache: Path) -> QemuInstall | None:
    """Return the install described by the cache's manifest, or None if absent/stale."""
    cache = Path(cache).resolve()
    manifest = _manifest_path(cache)
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        if data.get("manifest_version") != MANIFEST_VERSION:
            return None
        install = QemuInstall(
            prefix=cache / "qemu" / "prefix",
            version=str(data["qemu_version"]),
            suite=str(data["suite"]),
            packages={str(k): str(v) for k, v in data["packages"].items()},
        )
    except (ValueError, KeyError, AttributeError):
        return None
    if not install.binary.exists():
        return None
    return install


def ensure_qemu(cache: Path, *, quiet: bool = False) -> QemuInstall:
    """Return a working QEMU 11.1 install under ``cache``, provisioning it if needed.

    A second call with a complete cache downloads nothing and runs no apt.
    Raises ProvisionError if no suite offers QEMU 11.1 or it does not run.
    """
    cache = Path(cache).resolve()
    install = load_install(cache)
    if install is not None:
        if not quiet:
            print(f"==> QEMU {install.version} ({install.suite}) already in {install.prefix}",
                  file=sys.stderr)
        return install
    archive = DebianArchive(cache)
    errors: list[str] = []
    for suite in QEMU_SUITES:
        try:
            version = archive.candidate(QEMU_PACKAGE, arch=HOST_ARCH, suite=suite)
        except DebianArchiveError as exc:
            errors.append(str(exc))
            continue
        upstream = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
        if upstream is None or (int(upstream[1]), int(upstream[2])) != QEMU_MAJOR_MINOR:
            errors.append(f"{suite} has {QEMU_PACKAGE} {version}, expected 11.1.x")
            continue
        print(f"==> QEMU: {QEMU_PACKAGE} {version} from {suite}", file=sys.stderr, flush=True)
        packages = archive.fetch(
            [QEMU_PACKAGE], arch=HOST_ARCH, suite=suite, with_dependencies=True
        )
        prefix = cache / "qemu" / "prefix"
        unpack_packages(packages, prefix)
        install = QemuInstall(
            prefix=prefix,
            version="",
            suite=suite,
            packages={p.name: p.version for p in packages},
        )
        qemu_version = _parse_version(install.run("--version"))
        install = QemuInstall(prefix, qemu_version, suite, install.packages)
        _write_manifest(cache, install)
        for name, pkg_version in sorted(install.packages.items()):
            print(f"    {name} {pkg_version}", file=sys.stderr)
        print(f"==> QEMU {qemu_version} ready; manifest {_manifest_path(cache)}", file=sys.stderr)
        return install
    raise ProvisionError("no QEMU 11.1 found: " + "; ".join(errors))


def _write_manifest(cache: Path, install: QemuInstall) -> None:
    manifest = _manifest_path(cache)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "manifest_version": MANIFEST_VERSION,
        "qemu_version": install.version,
        "suite": install.suite,
        "package": QEMU_PACKAGE,
        "packages": dict(sorted(install.packages.items())),
    }
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(manifest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qmp_harness.provision``."""
    parser = argparse.ArgumentParser(description="provision QEMU 11.1 into the cache")
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        install = ensure_qemu(args.cache)
    except (ProvisionError, DebianArchiveError) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    print(f"QEMU {install.version}: {' '.join(install.argv())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
