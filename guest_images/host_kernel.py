"""The host-lane kernel: arm64 Linux with iommufd, built from Debian's source.

Debian's own kernels are built without ``CONFIG_IOMMUFD`` (DESIGN.md §7), so
the lane builds one: ``linux-source-7.3`` from trixie-backports, configured
with ``allnoconfig`` plus the checked-in fragment ``host_kernel.config``, and
compiled with bookworm's cross gcc, binutils, flex, bison and m4.  Everything
is fetched through the private apt roots and unpacked with ``dpkg-deb -x``
into the per-user cache; nothing is installed on the system.

The result is keyed by (source package version, fragment hash) under
``<cache>/host-kernel/<version>-<hash>/``; a second call finds it there and
builds nothing.  ``python -m guest_images.host_kernel`` provisions it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import (
    TOOLCHAIN_SUITES,
    DebianArchive,
    DebianArchiveError,
    unpack_packages,
)

SOURCE_PACKAGE = "linux-source-7.3"
SOURCE_SUITE = "trixie-backports"
TOOLCHAIN_SUITE = TOOLCHAIN_SUITES[0]
TOOLCHAIN_PACKAGES = (
    "gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu", "flex", "bison", "m4",
)
HOST_ARCH = "amd64"
HOST_TRIPLET = "x86_64-linux-gnu"
CROSS_PREFIX = "aarch64-linux-gnu-"
# The toolchain's closure as apt computes it for an empty system also holds
# the C runtime the host already runs on; unpacking a second libc next to the
# host's loader would only break it.
HOST_RUNTIME = frozenset({"libc6", "libgcc-s1", "libstdc++6", "gcc-12-base", "debconf"})
FRAGMENT = Path(__file__).with_name("host_kernel.config")
MANIFEST_VERSION = 1
PROGRESS_SECONDS = 30.0
_SYMBOL = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=y\s*$")
_OBJECT = re.compile(r"^\s+(CC|AS|LD|AR)\s+(\S+)")


class HostKernelError(RuntimeError):
    """The host kernel could not be fetched, configured or built."""


@dataclass(frozen=True)
class HostKernel:
    """A built host-lane kernel and where its source lies."""

    image: Path
    """The raw arm64 ``Image`` QEMU boots with ``-kernel``."""
    config: Path
    source_version: str
    fragment_hash: str
    source_tree: Path
    """The unpacked kernel source (for reading its selftests and drivers)."""


def fragment_hash(fragment: Path = FRAGMENT) -> str:
    """The content key of the config fragment (first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(fragment.read_bytes()).hexdigest()[:16]


def required_symbols(fragment_text: str) -> list[str]:
    """The ``CONFIG_*`` symbols the fragment sets to ``y``, in order."""
    return [m.group(1) for line in fragment_text.splitlines() if (m := _SYMBOL.match(line))]


def missing_symbols(fragment_text: str, config_text: str) -> list[str]:
    """Symbols the fragment asks for that a resolved ``.config`` does not set to ``y``."""
    present = {m.group(1) for line in config_text.splitlines() if (m := _SYMBOL.match(line))}
    return [s for s in required_symbols(fragment_text) if s not in present]


def _root(cache: Path) -> Path:
    return Path(cache).resolve() / "host-kernel"


def _entry(cache: Path, version: str, key: str) -> Path:
    return _root(cache) / f"{version.replace(':', '_')}-{key}"


def _source_tree(cache: Path, version: str) -> Path:
    return _root(cache) / "src" / version.replace(":", "_") / SOURCE_PACKAGE


def load_host_kernel(cache: Path, version: str, fragment: Path = FRAGMENT) -> HostKernel | None:
    """The kernel built from ``version`` and ``fragment``, if the cache holds it."""
    key = fragment_hash(fragment)
    entry = _entry(cache, version, key)
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        return None
    kernel = HostKernel(entry / "Image", entry / "config", version, key,
                        _source_tree(cache, version))
    return kernel if kernel.image.exists() else None


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    _root(cache).mkdir(parents=True, exist_ok=True)
    with open(_root(cache) / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def ensure_host_kernel(
    cache: Path | None = None, *, fragment: Path = FRAGMENT, jobs: int | None = None
) -> HostKernel:
    """Return the host kernel, fetching the source and toolchain and building it if needed.

    Raises HostKernelError when the build fails or a requested symbol did not
    survive configuration, DebianArchiveError when apt cannot deliver a package.
    """
    cache = Path(cache or default_cache()).resolve()
    # The source version last built is reused without asking apt (apt is slow under
    # load); remove <cache>/host-kernel/current to move to a newer Debian upload.
    current = _root(cache) / "current"
    if current.exists():
        kernel = load_host_kernel(cache, current.read_text().strip(), fragment)
        if kernel is not None:
            _say(f"host kernel {SOURCE_PACKAGE} {kernel.source_version} already built: "
                 f"{kernel.image}")
            return kernel
    archive = DebianArchive(cache)
    version = archive.candidate(SOURCE_PACKAGE, arch=HOST_ARCH, suite=SOURCE_SUITE)
    kernel = load_host_kernel(cache, version, fragment)
    if kernel is not None:
        current.write_text(version + "\n")
        _say(f"host kernel {SOURCE_PACKAGE} {version} already built: {kernel.image}")
        return kernel
    with _locked(cache):
        kernel = load_host_kernel(cache, version, fragment)
        if kernel is not None:
            return kernel
        started = time.monotonic()
        source = _unpack_source(cache, archive, version)
        toolchain = _unpack_toolchain(cache)
        kernel = _build(cache, source, toolchain, version, fragment, jobs or os.cpu_count() or 1)
        current.write_text(version + "\n")
        _say(f"host kernel built in {_clock(time.monotonic() - started)}: {kernel.image}")
        return kernel


def _unpack_source(cache: Path, archive: DebianArchive, version: str) -> Path:
    """Unpack the source package and the tarball inside it; return the source tree."""
    tree = _source_tree(cache, version)
    stamp = tree.parent / ".extracted"
    if stamp.exists() and tree.is_dir():
        return tree
    _say(f"kernel source {SOURCE_PACKAGE} {version} from {SOURCE_SUITE}")
    packages = archive.fetch([SOURCE_PACKAGE], arch=HOST_ARCH, suite=SOURCE_SUITE)
    deb_root = tree.parent / "deb"
    unpack_packages(packages, deb_root)
    tarballs = sorted((deb_root / "usr/src").glob(f"{SOURCE_PACKAGE}.tar*"))
    if len(tarballs) != 1:
        raise HostKernelError(
            f"{SOURCE_PACKAGE} {version} holds tarballs {tarballs}, expected exactly one"
        )
    if tree.exists():
        shutil.rmtree(tree)
    _say(f"extracting {tarballs[0].name} (about 1.8 GB unpacked)")
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(tree.parent)], what="tar")
    if not (tree / "Makefile").exists():
        raise HostKernelError(f"{tarballs[0]} did not unpack into {tree}")
    shutil.rmtree(deb_root)
    stamp.write_text(f"{SOURCE_PACKAGE} {version}\n")
    return tree


def _unpack_toolchain(cache: Path) -> Path:
    """Fetch bookworm's cross toolchain (without the host's own C runtime) and unpack it."""
    archive = DebianArchive(cache, suites=TOOLCHAIN_SUITES)
    closure = archive.resolve(
        TOOLCHAIN_PACKAGES, arch=HOST_ARCH, suite=TOOLCHAIN_SUITE, with_dependencies=True
    )
    wanted = [package for package in closure if package[0] not in HOST_RUNTIME]
    packages = archive.fetch_resolved(wanted, suite=TOOLCHAIN_SUITE)
    prefix = Path(cache) / "toolchain" / f"{TOOLCHAIN_SUITE}-aarch64"
    unpack_packages(packages, prefix)
    return prefix


def toolchain_env(toolchain: Path) -> dict[str, str]:
    """The environment that runs the private toolchain from its unpacked prefix."""
    env = dict(os.environ)
    env["PATH"] = f"{toolchain / 'usr/bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["LD_LIBRARY_PATH"] = str(toolchain / "usr/lib" / HOST_TRIPLET)
    # m4 and bison look for each other and their data at configure-time paths.
    env["M4"] = str(toolchain / "usr/bin/m4")
    env["BISON_PKGDATADIR"] = str(toolchain / "usr/share/bison")
    env["ARCH"] = "arm64"
    env["CROSS_COMPILE"] = CROSS_PREFIX
    # A reproducible banner: the same inputs give the same Image.
    env["KBUILD_BUILD_USER"] = "vsmmu"
    env["KBUILD_BUILD_HOST"] = "host-lane"
    env["KBUILD_BUILD_TIMESTAMP"] = "1970-01-01"
    return env


def _build(
    cache: Path, source: Path, toolchain: Path, version: str, fragment: Path, jobs: int
) -> HostKernel:
    key = fragment_hash(fragment)
    # One object tree per source version: a changed fragment rebuilds only what changed.
    out = _root(cache) / "build" / version.replace(":", "_")
    out.mkdir(parents=True, exist_ok=True)
    env = toolchain_env(toolchain)
    make = ["make", "-C", str(source), f"O={out}", "ARCH=arm64", f"CROSS_COMPILE={CROSS_PREFIX}"]
    _say(f"configuring: allnoconfig + {fragment.name} ({key})")
    _run([*make, f"KCONFIG_ALLCONFIG={fragment}", "allnoconfig"], what="make allnoconfig",
         env=env)
    config_text = (out / ".config").read_text()
    missing = missing_symbols(fragment.read_text(), config_text)
    if missing:
        raise HostKernelError(
            f"allnoconfig + {fragment.name} left {', '.join(missing)} unset, expected =y "
            "(a dependency of theirs is missing from the fragment)"
        )
    _say(f"building arm64 Image with {jobs} job(s); about 12 min on 2 cores, log in "
         f"{out / 'build.log'}")
    _run_with_progress([*make, f"-j{jobs}", "Image"], env=env, log=out / "build.log")
    entry = _entry(cache, version, key)
    partial = entry.with_name(entry.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    shutil.copyfile(out / "arch/arm64/boot/Image", partial / "Image")
    shutil.copyfile(out / ".config", partial / "config")
    shutil.copyfile(fragment, partial / "fragment.config")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source_package": SOURCE_PACKAGE,
        "source_version": version,
        "fragment_hash": key,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if entry.exists():
        shutil.rmtree(entry)
    partial.rename(entry)
    kernel = load_host_kernel(cache, version, fragment)
    if kernel is None:
        raise HostKernelError(f"built kernel did not land in {entry}")
    return kernel


def _run(argv: list[str], *, what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise HostKernelError(f"{what} exited with status {proc.returncode}, expected 0:\n{tail}")


def _run_with_progress(argv: list[str], *, env: dict[str, str], log: Path) -> None:
    """Run the build, logging everything and printing one progress line every half minute."""
    started = time.monotonic()
    last_report = started
    objects = 0
    current = ""
    with open(log, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            match = _OBJECT.match(line)
            if match:
                objects += 1
                current = match.group(2)
            now = time.monotonic()
            if now - last_report >= PROGRESS_SECONDS:
                last_report = now
                print(f"    [{_clock(now - started)}] {objects} objects built, at {current}",
                      file=sys.stderr, flush=True)
        status = proc.wait()
    if status != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise HostKernelError(
            f"kernel build exited with status {status}, expected 0 (full log {log}):\n{tail}"
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def main(argv: list[str] | None = None) -> int:
    """Provision the host-lane kernel and print where its Image is."""
    parser = argparse.ArgumentParser(prog="guest_images.host_kernel", description=__doc__)
    parser.add_argument("--cache", type=Path, default=None, help="default: the per-user cache")
    parser.add_argument("--jobs", type=int, default=None, help="make -j (default: all cores)")
    args = parser.parse_args(argv)
    try:
        kernel = ensure_host_kernel(args.cache, jobs=args.jobs)
    except (HostKernelError, DebianArchiveError) as exc:
        print(f"guest_images.host_kernel: {exc}", file=sys.stderr)
        return 1
    print(f"host kernel {SOURCE_PACKAGE} {kernel.source_version} "
          f"(fragment {kernel.fragment_hash}): {kernel.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
