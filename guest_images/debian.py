"""A private apt root: fetch Debian packages without touching the system.

The machine runs Debian 12, but we need QEMU 11.1 (trixie-backports or sid)
and arm64 kernels.  apt itself can do the resolving and downloading if it is
pointed at a private configuration: its own ``sources.list`` (trixie,
trixie-backports, sid), its own lists directory, an *empty* dpkg status file
(so the dependency closure is computed as for an empty system) and its own
download cache.  Packages are then unpacked with ``dpkg -x`` into directories
under the cache; nothing is installed.

Typical use::

    from guest_images.debian import DebianArchive
    archive = DebianArchive(Path(".cache"))
    root = archive.fetch_unpacked(["linux-libc-dev"], arch="amd64", suite="sid")
    header = root / "usr/include/linux/iommufd.h"

The download cache defaults to ``<cache>/apt/archives``; the environment
variable ``VSMMU_APT_ARCHIVES`` points it elsewhere (a CI cache, or the cache
of another checkout), which is only a speed-up: every ``.deb`` is checked
against the signed indexes by apt as usual.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("trixie", "trixie-backports", "sid")
TOOLCHAIN_SUITES = ("bookworm",)
"""A second root for build tools that must run on this Debian 12 host (its glibc)."""
ARCHITECTURES = ("amd64", "arm64")
ARCHIVES_ENV = "VSMMU_APT_ARCHIVES"

# apt's pin priorities: a requested suite (-t) gets 990; trixie is the default
# base; sid gets the "not automatic" priority so it is only used when asked for.
SID_PRIORITY = 1


class DebianArchiveError(RuntimeError):
    """apt could not resolve, download or unpack what was asked for."""


@dataclass(frozen=True)
class DebianPackage:
    """One downloaded binary package."""

    name: str
    version: str
    architecture: str
    deb: Path

    def __str__(self) -> str:
        return f"{self.name}:{self.architecture} {self.version}"


def _deb_fields(deb: Path) -> dict[str, str]:
    """Read Package/Version/Architecture from a .deb's control file."""
    out = subprocess.run(
        ["dpkg-deb", "--show", "--showformat=${Package}\t${Version}\t${Architecture}", str(deb)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name, version, arch = out.split("\t")
    return {"Package": name, "Version": version, "Architecture": arch}


class DebianArchive:
    """A private apt root under ``<cache>/apt`` for trixie, trixie-backports and sid.

    Another ``suites`` set gets a root of its own (``<cache>/apt-<suites>``), so
    its indexes never change what the default root resolves.  Every method is
    safe to call from several processes at once: apt runs under an exclusive
    lock on ``<root>/lock``.
    """

    def __init__(
        self, cache: Path, *, archives: Path | None = None, suites: Sequence[str] = SUITES
    ) -> None:
        self.cache = Path(cache).resolve()
        self.suites = tuple(suites)
        self.root = self.cache / (
            "apt" if self.suites == SUITES else "apt-" + "-".join(self.suites)
        )
        env_archives = os.environ.get(ARCHIVES_ENV)
        if archives is None and env_archives:
            archives = Path(env_archives)
        self.archives = (archives or self.root / "archives").resolve()
        self._write_config()

    # -- configuration -----------------------------------------------------

    @property
    def config_file(self) -> Path:
        """The file ``APT_CONFIG`` points at."""
        return self.root / "apt.conf"

    @property
    def lists_dir(self) -> Path:
        """apt's private lists directory (the downloaded indexes)."""
        return self.root / "lists"

    def _write_config(self) -> None:
        etc = self.root / "etc"
        for directory in (
            etc / "apt.conf.d",
            etc / "preferences.d",
            etc / "sources.list.d",
            self.lists_dir / "partial",
            self.archives / "partial",
            self.root / "state",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.write_text("")
        arch_list = ",".join(ARCHITECTURES)
        _write_if_changed(
            etc / "sources.list",
            "".join(
                f"deb [arch={arch_list} signed-by={KEYRING}] {MIRROR} {suite} main\n"
                for suite in self.suites
            ),
        )
        _write_if_changed(
            etc / "preferences",
            f"Package: *\nPin: release n=sid\nPin-Priority: {SID_PRIORITY}\n",
        )
        host_arch = ARCHITECTURES[0]
        foreign = " ".join(f'"{a}";' for a in ARCHITECTURES)
        _write_if_changed(
            self.config_file,
            f"""// Generated by guest_images.debian: a private apt root, see DESIGN.md section 9.
Dir::Etc "{etc}/";
Dir::Etc::main "/dev/null";
Dir::Etc::Parts "{etc}/apt.conf.d/";
Dir::Etc::SourceList "{etc}/sources.list";
Dir::Etc::SourceParts "{etc}/sources.list.d/";
Dir::Etc::Preferences "{etc}/preferences";
Dir::Etc::PreferencesParts "{etc}/preferences.d/";
Dir::State "{self.root}/state/";
Dir::State::Lists "{self.lists_dir}/";
Dir::State::status "{status}";
Dir::Cache "{self.root}/cache/";
Dir::Cache::Archives "{self.archives}/";
Dir::Log "{self.root}/log/";
APT::Architecture "{host_arch}";
APT::Architectures {{ {foreign} }};
APT::Sandbox::User "root";
APT::Get::AllowUnauthenticated "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Acquire::PDiffs "false";
// The machine clock may be off; signatures are still checked.
Acquire::Check-Valid-Until "false";
Acquire::Retries "3";
Debug::NoLocking "true";
""",
        )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["APT_CONFIG"] = str(self.config_file)
        env["DEBIAN_FRONTEND"] = "noninteractive"
        return env

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _apt(self, *args: str, capture: bool = False, cwd: Path | None = None) -> str:
        """Run an apt command under the private configuration.

        Output goes to our stderr (so the user sees download progress)
        unless ``capture`` is set.
        """
        argv = list(args)
        log.debug("apt: %s", " ".join(argv))
        proc = subprocess.run(
            argv,
            env=self._env(),
            cwd=cwd,
            stdout=subprocess.PIPE if capture else sys.stderr,
            stderr=subprocess.PIPE if capture else sys.stderr,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip()[-2000:] if capture else "see output above"
            raise DebianArchiveError(
                f"apt command {' '.join(argv)!r} exited with status {proc.returncode}, "
                f"expected 0 ({detail})"
            )
        return proc.stdout if capture else ""

    # -- indexes -----------------------------------------------------------

    def has_lists(self) -> bool:
        """True when the indexes of every suite have been downloaded."""
        names = [p.name for p in self.lists_dir.glob("*_Packages*")]
        return all(any(f"_dists_{suite}_main_" in n for n in names) for suite in self.suites)

    def update(self, *, force: bool = False) -> None:
        """Download the package indexes (skipped if present, unless ``force``)."""
        with self._locked():
            if force or not self.has_lists():
                print(f"==> apt update (private root {self.root})", file=sys.stderr, flush=True)
                self._apt("apt-get", "update")

    # -- resolving and downloading ----------------------------------------

    def candidate(self, name: str, *, arch: str, suite: str) -> str:
        """Return the version apt would pick for ``name:arch`` from ``suite``.

        Raises DebianArchiveError when the suite does not carry the package.
        """
        self.update()
        out = self._apt(
            "apt-cache", "-t", suite, "policy", f"{name}:{arch}", capture=True
        )
        match = re.search(r"Candidate:\s*(\S+)", out)
        if match is None or match.group(1) == "(none)":
            raise DebianArchiveError(
                f"package {name}:{arch} has no candidate in suite {suite!r}, expected one"
            )
        version = match.group(1)
        # A candidate from another suite is not what the caller asked for.
        if not self._version_in_suite(out, version, suite):
            raise DebianArchiveError(
                f"package {name}:{arch}: candidate {version} is not from suite {suite!r}"
            )
        return version

    @staticmethod
    def _version_in_suite(policy: str, version: str, suite: str) -> bool:
        table = policy.split("Version table:", 1)[-1]
        current: str | None = None
        for line in table.splitlines():
            head = re.match(r"\s*(?:\*\*\*\s+)?(\S+)\s+-?\d+\s*$", line)
            if head:
                current = head.group(1)
                continue
            if current == version and re.search(rf"\s{re.escape(suite)}/main\s", line + " "):
                return True
        return False

    def resolve(
        self,
        names: Sequence[str],
        *,
        arch: str,
        suite: str,
        with_dependencies: bool = False,
    ) -> list[tuple[str, str, str]]:
        """Return ``(name, version, arch)`` for what :meth:`fetch` would download.

        With ``with_dependencies`` the closure is computed as for an empty
        system (Depends and Pre-Depends, no Recommends), preferring ``suite``
        and falling back to trixie for packages ``suite`` does not carry.
        """
        self.update()
        targets = [f"{n}:{arch}" for n in names]
        if not with_dependencies:
            return [(n, self.candidate(n, arch=arch, suite=suite), arch) for n in names]
        out = self._apt(
            "apt-get", "-s", "-t", suite, "install", "--no-install-recommends", *targets,
            capture=True,
        )
        result = []
        for line in out.splitlines():
            m = re.match(r"Inst (\S+) \((\S+) .*\[(\S+)\]\)", line)
            if m:
                pkg, version, pkg_arch = m.groups()
                result.append((pkg.split(":")[0], version, pkg_arch))
        if not result:
            raise DebianArchiveError(f"apt resolved nothing for {targets} from {suite!r}")
        return result

    def fetch(
        self,
        names: Sequence[str],
        *,
        arch: str,
        suite: str,
        with_dependencies: bool = False,
    ) -> list[DebianPackage]:
        """Download ``names`` (for ``arch``, from ``suite``) and return the packages.

        ``.deb`` files already in the download cache are not fetched again.
        Raises DebianArchiveError if a package is missing from the suite.
        """
        wanted = self.resolve(names, arch=arch, suite=suite, with_dependencies=with_dependencies)
        return self.fetch_resolved(wanted, suite=suite)

    def fetch_resolved(
        self, wanted: Sequence[tuple[str, str, str]], *, suite: str
    ) -> list[DebianPackage]:
        """Download exactly these ``(name, version, arch)`` (as :meth:`resolve` returns them).

        ``suite`` only labels the progress output.
        """
        packages: list[DebianPackage] = []
        missing: list[tuple[str, str, str]] = []
        for name, version, pkg_arch in wanted:
            deb = self._cached_deb(name, version, pkg_arch)
            if deb is None:
                missing.append((name, version, pkg_arch))
            else:
                packages.append(DebianPackage(name, version, pkg_arch, deb))
        if missing:
            print(
                f"==> downloading {len(missing)} Debian package(s) from {suite} "
                f"into {self.archives}",
                file=sys.stderr,
                flush=True,
            )
            with self._locked():
                self._apt(
                    "apt-get", "download",
                    *(f"{n}:{a}={v}" for n, v, a in missing),
                    cwd=self.archives,
                )
            for name, version, pkg_arch in missing:
                deb = self._cached_deb(name, version, pkg_arch)
                if deb is None:
                    raise DebianArchiveError(
                        f"apt reported success but {name}_{version}_{pkg_arch}.deb "
                        f"is not in {self.archives}"
                    )
                packages.append(DebianPackage(name, version, pkg_arch, deb))
        return packages

    def _cached_deb(self, name: str, version: str, arch: str) -> Path | None:
        # apt encodes ':' in versions (epochs) as %3a in file names.
        quoted = version.replace(":", "%3a")
        for candidate_arch in (arch, "all"):
            deb = self.archives / f"{name}_{quoted}_{candidate_arch}.deb"
            if deb.exists() and deb.stat().st_size > 0:
                return deb
        return None

    def fetch_unpacked(
        self,
        names: Sequence[str],
        *,
        arch: str,
        suite: str,
        with_dependencies: bool = False,
        dest: Path | None = None,
    ) -> Path:
        """Fetch ``names`` and unpack them into one directory; return that directory.

        The default destination is ``<cache>/debs/<suite>-<arch>/<first name>``;
        it is reused when it already holds exactly these package versions.
        """
        packages = self.fetch(names, arch=arch, suite=suite, with_dependencies=with_dependencies)
        target = dest or self.cache / "debs" / f"{suite}-{arch}" / names[0]
        unpack_packages(packages, target)
        return target


def unpack_packages(packages: Iterable[DebianPackage], dest: Path) -> None:
    """Unpack ``packages`` with ``dpkg -x`` into ``dest``.

    A stamp file records what was unpacked; when it matches, nothing is done.
    Otherwise ``dest`` is rebuilt from scratch so no stale files remain.
    """
    packages = sorted(packages, key=lambda p: (p.name, p.architecture))
    stamp_text = "".join(f"{p}\n" for p in packages)
    stamp = dest / ".unpacked"
    if stamp.exists() and stamp.read_text() == stamp_text:
        return
    if dest.exists():
        shutil.rmtree(dest)
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for pkg in packages:
        log.info("unpacking %s", pkg)
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(pkg.deb), str(partial)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise DebianArchiveError(
                f"dpkg-deb -x {pkg.deb} failed with status {proc.returncode}: {proc.stderr.strip()}"
            )
    (partial / ".unpacked").write_text(stamp_text)
    partial.rename(dest)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def deb_identity(deb: Path) -> DebianPackage:
    """Describe an existing ``.deb`` file as a :class:`DebianPackage`."""
    fields = _deb_fields(deb)
    return DebianPackage(fields["Package"], fields["Version"], fields["Architecture"], deb)
