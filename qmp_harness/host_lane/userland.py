"""The host lane's userland: busybox, Debian's arm64 Python 3.13, this project and its deps.

Python comes from trixie's arm64 packages (``python3.13-minimal`` and
``libpython3.13-stdlib`` with their closure), unpacked and pruned.  Debian
compiles a package's ``.pyc`` at install time, which never happens here, and
compiling the standard library at every boot under TCG costs seconds; so the
tree is compiled once on the host, by the very same Python release for
amd64 (run through its own loader from an unpacked prefix, like QEMU), with
``unchecked-hash`` invalidation: the newc writer sets every mtime to 0.

The pure-Python dependencies are copied and compiled once per set of
versions (:func:`ensure_site`); this project's packages are copied and
compiled at each run, so the lane always runs the working tree's code.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from guest_images.debian import DebianArchive, unpack_packages

PYTHON_SUITE = "trixie"
PYTHON_RELEASE = "3.13"
GUEST_PACKAGES = ("python3.13-minimal", "libpython3.13-stdlib")
HOST_PACKAGES = ("python3.13-minimal",)
GUEST_ARCH = "arm64"
HOST_ARCH = "amd64"
HOST_TRIPLET = "x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
STDLIB = f"usr/lib/python{PYTHON_RELEASE}"
# Parts of the unpacked packages no program in the lane needs.
PRUNED = (
    "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian",
    "usr/share/zoneinfo", "usr/share/info", "usr/share/bug", "usr/share/debconf",
    f"{STDLIB}/test", f"{STDLIB}/idlelib", f"{STDLIB}/tkinter", f"{STDLIB}/turtledemo",
    f"{STDLIB}/ensurepip", f"{STDLIB}/pydoc_data", f"{STDLIB}/lib2to3",
)
PROJECT_PACKAGES = ("vsmmu", "qmp_harness", "guest_images", "tests")
"""This project's top-level directories that go into the lane."""
DISTRIBUTIONS = (
    "construct", "qemu.qmp", "pyelftools", "pytest", "pluggy", "iniconfig", "packaging",
    "pygments", "pytest-asyncio", "typing_extensions",
)
"""Pure-Python distributions of the venv (the project's and its tests' dependencies) the lane
carries, with their metadata so pytest finds its plugins; absent ones are skipped.
(hypothesis is not among them: it ships a compiled extension for the host.)"""
GUEST_SITE = "lane/site"
GUEST_PROJECT = "lane/project"


class UserlandError(RuntimeError):
    """The lane's Python could not be provisioned or compiled."""


@dataclass(frozen=True)
class LanePython:
    """An unpacked, compiled arm64 Python and the amd64 twin that compiles for it."""

    guest_root: Path
    """The arm64 tree, laid out as the lane's root filesystem (``usr/``, ``lib`` link)."""
    host_root: Path
    version: str

    def compile(self, tree: Path, *, strip: Path) -> None:
        """Compile every ``.py`` under ``tree`` for its place in L1 (``tree`` minus ``strip``).

        Raises UserlandError when the compiler fails.
        """
        lib = self.host_root / "usr/lib" / HOST_TRIPLET
        argv = [
            str(lib / LOADER), "--library-path", f"{lib}:{self.host_root / 'lib' / HOST_TRIPLET}",
            str(self.host_root / f"usr/bin/python{PYTHON_RELEASE}"),
            "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
            "-s", str(strip), "-p", "/", str(tree),
        ]
        env = {"PYTHONHOME": str(self.host_root / "usr"), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UserlandError(
                f"compileall of {tree} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )


def ensure_python(cache: Path) -> LanePython:
    """Fetch, unpack, prune and compile the lane's Python (once; later calls ask apt nothing).

    ``<cache>/host-lane/python/current`` names the compiled tree in use; remove
    it to pick up a newer Debian release.
    """
    current = Path(cache) / "host-lane" / "python" / "current"
    if current.exists():
        base = current.parent / current.read_text().strip()
        if (base / ".compiled").exists():
            return LanePython(base / GUEST_ARCH, base / HOST_ARCH, base.name)
    archive = DebianArchive(cache)
    guest = [
        (n, v, a) for n, v, a in archive.resolve(
            GUEST_PACKAGES, arch=GUEST_ARCH, suite=PYTHON_SUITE, with_dependencies=True)
        if a in (GUEST_ARCH, "all")
    ]
    version = next(v for n, v, _ in guest if n == GUEST_PACKAGES[0])
    base = Path(cache) / "host-lane" / "python" / version.replace(":", "_")
    guest_root, host_root = base / GUEST_ARCH, base / HOST_ARCH
    python = LanePython(guest_root, host_root, version)
    stamp = base / ".compiled"
    if stamp.exists():
        current.write_text(base.name + "\n")
        return python
    print(f"==> lane Python {version} ({len(guest)} arm64 packages from {PYTHON_SUITE})",
          file=sys.stderr, flush=True)
    unpack_packages(archive.fetch_resolved(guest, suite=PYTHON_SUITE), guest_root)
    host = archive.resolve(HOST_PACKAGES, arch=HOST_ARCH, suite=PYTHON_SUITE,
                           with_dependencies=True)
    unpack_packages(archive.fetch_resolved(host, suite=PYTHON_SUITE), host_root)
    for relative in PRUNED:
        shutil.rmtree(guest_root / relative, ignore_errors=True)
    print("==> compiling the lane's standard library", file=sys.stderr, flush=True)
    python.compile(guest_root / STDLIB, strip=guest_root)
    stamp.write_text(version + "\n")
    current.write_text(base.name + "\n")
    return python


@dataclass(frozen=True)
class TreeFile:
    """One file or link of a tree to be placed in the lane (``target`` set for a link)."""

    name: str
    source: Path | None
    mode: int
    target: str | None = None


def walk_tree(root: Path, prefix: str = "") -> Iterator[TreeFile]:
    """Directories, files and links under ``root``, parents first, sorted, named ``prefix/...``."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in paths:
        relative = "" if path == root and root.is_dir() else path.relative_to(
            root if root.is_dir() else root.parent).as_posix()
        name = "/".join(p for p in (prefix, relative) if p)
        if not name:
            continue
        if path.is_symlink():
            yield TreeFile(name, None, 0, str(path.readlink()))
        elif path.is_dir():
            yield TreeFile(name, None, path.stat().st_mode)
        elif path.is_file():
            yield TreeFile(name, path, path.stat().st_mode)


def distribution_files(names: Iterable[str] = DISTRIBUTIONS) -> Iterator[tuple[Path, str]]:
    """``(installed file, path relative to site-packages)`` of every file of ``names``.

    Files installed outside site-packages (scripts) and bytecode are left out.
    """
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            relative = file.as_posix()
            if relative.startswith("..") or "__pycache__" in relative:
                continue
            yield Path(str(dist.locate_file(file))), relative


def ensure_site(cache: Path, python: LanePython) -> Path:
    """The dependencies' tree (``lane/site``, compiled), cached by their versions.

    Returns the directory that holds ``lane/site``.
    """
    versions = []
    for name in DISTRIBUTIONS:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    key = hashlib.sha256("\n".join([python.version, *versions]).encode()).hexdigest()[:16]
    root = Path(cache) / "host-lane" / "site" / key
    if (root / ".compiled").exists():
        return root
    partial = root.with_name(key + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for source, relative in distribution_files():
        target = partial / GUEST_SITE / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    python.compile(partial / GUEST_SITE, strip=partial)
    (partial / ".compiled").write_text("\n".join(versions) + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def stage_project(project_root: Path, stage: Path, python: LanePython,
                  extra: Sequence[Path] = ()) -> None:
    """Copy the project and ``extra`` files into ``stage`` and compile the project.

    ``stage`` is laid out as the lane's root: ``lane/project`` and ``work``
    (the command's working directory, holding ``extra``).
    """
    if stage.exists():
        shutil.rmtree(stage)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in PROJECT_PACKAGES:
        shutil.copytree(project_root / name, stage / GUEST_PROJECT / name, ignore=ignore)
    for pyproject in ("pyproject.toml",):
        shutil.copy2(project_root / pyproject, stage / GUEST_PROJECT / pyproject)
    work = stage / "work"
    work.mkdir(parents=True)
    for path in extra:
        if path.is_dir():
            shutil.copytree(path, work / path.name, ignore=ignore)
        else:
            shutil.copy2(path, work / path.name)
    python.compile(stage / "lane", strip=stage)
