"""The host lane: run a command on a real iommufd kernel under QEMU's nesting SMMUv3.

L1 is ``-M virt,iommu=smmuv3,gic-version=3,acpi=on`` under TCG, booted
through UEFI (Debian's ``qemu-efi-aarch64``) with ACPI, running the kernel
``guest_images.host_kernel`` builds.  Its initrd is an uncompressed newc
archive whose first member is QEMU's own IORT upgraded to CANWBS (see
:mod:`qmp_harness.host_lane.iort` for why), then busybox, Debian's arm64
Python with a compiled standard library, this project with its pure-Python
dependencies, and an ``/init`` that binds every ``iommu-testdev`` function to
``vfio-pci``, runs the command in ``/work`` and powers off.

Typical use::

    lane = HostLane.provision(cache)
    result = await lane.run(["python3", "-c", "import os; print(os.listdir('/dev/iommu'))"],
                            LaneConfig(testdevs=2))
    print(result.output, result.status)

The command sees ``$VSMMU_VFIO_CDEVS`` (the comma-separated VFIO cdevs of
the bound functions, in PCI order) and ``$VSMMU_HOST_LANE=1``.  Its stdout
and stderr both arrive through the serial console, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shlex
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import DebianArchive
from guest_images.host_kernel import HostKernel, ensure_host_kernel
from guest_images.kernel import ensure_guest
from guest_images.newc import NewcEntry, write_newc
from qmp_harness.host_lane.fwcfg import read_fw_cfg_file
from qmp_harness.host_lane.iort import TABLE_UPGRADE_PATH, find_iort, upgrade_to_canwbs
from qmp_harness.host_lane.userland import (
    PYTHON_RELEASE,
    LanePython,
    TreeFile,
    ensure_python,
    ensure_site,
    stage_project,
    walk_tree,
)
from qmp_harness.provision import QemuInstall, ensure_qemu

FIRMWARE_PACKAGE = "qemu-efi-aarch64"
FIRMWARE_SUITE = "trixie"
FIRMWARE_FILE = "usr/share/qemu-efi-aarch64/QEMU_EFI.fd"
ACPI_TABLES_FILE = "etc/acpi/tables"
MACHINE = "virt,iommu=smmuv3,gic-version=3,acpi=on"
APPEND = "console=ttyAMA0 acpi=force quiet panic=-1"
TESTDEV = "iommu-testdev"
TESTDEV_VENDOR_DEVICE = "0x1b36:0x0005"
"""``iommu-testdev``'s PCI vendor:device, as sysfs prints them."""
FIRST_TESTDEV_SLOT = 2
DEFAULT_TIMEOUT = 1200.0
CONSOLE_CHUNK = 1 << 16
"""Bytes read from the console at a time."""
BASE_FORMAT = 2
"""Bumped when the base initrd's layout changes, so cached ones are rebuilt."""
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1


class LaneError(RuntimeError):
    """The lane could not be provisioned, or L1 did not run the command to its end."""


@dataclass(frozen=True)
class LaneConfig:
    """The L1 machine: how many ``iommu-testdev`` functions, memory, vCPUs, time limit."""

    testdevs: int = 2
    memory_mib: int = 2048
    cpus: int = 2
    timeout: float = DEFAULT_TIMEOUT
    """Seconds from QEMU's start to the command's end before L1 is killed."""

    def machine_args(self) -> list[str]:
        """The machine and devices; the same for the IORT extraction and the boot."""
        args = ["-M", MACHINE, "-cpu", "max", "-smp", str(self.cpus), "-m", f"{self.memory_mib}M"]
        for index in range(self.testdevs):
            args += ["-device", f"{TESTDEV},bus=pcie.0,addr={FIRST_TESTDEV_SLOT + index:#x}"]
        return args


@dataclass(frozen=True)
class LaneResult:
    """What a command did in L1."""

    status: int
    """The command's exit status."""
    output: str
    """Everything the command wrote (stdout and stderr, console line endings undone)."""
    console: str
    """The whole console transcript, firmware and kernel included."""
    init_seconds: float
    """QEMU start to ``/init`` ready (firmware, kernel boot, vfio-pci binding)."""
    wall_seconds: float


class HostLane:
    """A provisioned lane: QEMU, firmware, host kernel, busybox and Python, all in the cache."""

    def __init__(self, cache: Path, install: QemuInstall, kernel: HostKernel, firmware: Path,
                 busybox: Path, python: LanePython, site: Path, project_root: Path) -> None:
        self.cache = cache
        self.install = install
        self.kernel = kernel
        self.firmware = firmware
        self.busybox = busybox
        self.python = python
        self.site = site
        """The directory holding ``lane/site`` (the compiled dependencies)."""
        self.project_root = project_root

    @classmethod
    def provision(cls, cache: Path | None = None) -> HostLane:
        """Fetch or build everything the lane needs (idempotent; a warm cache builds nothing)."""
        cache = Path(cache or default_cache()).resolve()
        install = ensure_qemu(cache, quiet=True)
        kernel = ensure_host_kernel(cache)
        firmware = cache / "host-lane" / "firmware" / FIRMWARE_FILE
        if not firmware.exists():
            DebianArchive(cache).fetch_unpacked([FIRMWARE_PACKAGE], arch="amd64",
                                                suite=FIRMWARE_SUITE, dest=firmware.parents[3])
        if not firmware.exists():
            raise LaneError(f"{FIRMWARE_PACKAGE} has no {FIRMWARE_FILE}")
        busybox = ensure_guest(cache, quiet=True).busybox
        python = ensure_python(cache)
        return cls(cache, install, kernel, firmware, busybox, python, ensure_site(cache, python),
                   Path(__file__).resolve().parents[2])

    # -- the initrd ---------------------------------------------------------

    def upgraded_iort(self, config: LaneConfig) -> bytes:
        """QEMU's IORT for ``config``'s machine, declared CANWBS (cached per QEMU and machine)."""
        key = hashlib.sha256(
            "\0".join([self.install.version, *config.machine_args()]).encode()).hexdigest()[:16]
        path = self.cache / "host-lane" / "iort" / f"IORT-canwbs-{key}.aml"
        if not path.exists():
            tables = read_fw_cfg_file(self.install, config.machine_args(), ACPI_TABLES_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_bytes(upgrade_to_canwbs(find_iort(tables)))
            partial.rename(path)
        return path.read_bytes()

    def base_initrd(self, config: LaneConfig) -> bytes:
        """The part of the initrd every run shares: IORT first, busybox, Python, dependencies."""
        iort = self.upgraded_iort(config)
        key = hashlib.sha256(b"".join([
            str(BASE_FORMAT).encode(), iort, self.python.version.encode(),
            str(self.busybox.stat().st_size).encode(), self.site.name.encode()])).hexdigest()[:16]
        path = self.cache / "host-lane" / "initrd" / f"base-{key}.cpio"
        if path.exists():
            return path.read_bytes()
        entries = [NewcEntry.directory(d) for d in ("kernel", "kernel/firmware",
                                                     "kernel/firmware/acpi")]
        # The table upgrade only looks at the start of the initrd, so the IORT leads.
        entries.append(NewcEntry.file(TABLE_UPGRADE_PATH, iort))
        entries += [NewcEntry.directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "run",
                                                     "root", "etc")]
        entries.append(NewcEntry.char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR))
        entries.append(NewcEntry.file("bin/busybox", self.busybox.read_bytes(), 0o755))
        # Debian trixie is merged-/usr: its loader lives in /usr/lib, found through /lib.
        entries.append(NewcEntry.symlink("lib", "usr/lib"))
        entries += _tree_entries(walk_tree(self.python.guest_root / "usr", "usr"))
        entries.append(NewcEntry.symlink("usr/bin/python3", f"python{PYTHON_RELEASE}"))
        entries.append(NewcEntry.directory("lane"))
        entries += _tree_entries(walk_tree(self.site / "lane" / "site", "lane/site"))
        data = write_newc(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(path)
        return data

    def run_initrd(self, command: Sequence[str], files: Sequence[Path],
                   env: Mapping[str, str], marker: str, stage: Path) -> bytes:
        """The per-run part: ``/init``, the project and ``files`` in /work."""
        stage_project(self.project_root, stage, self.python, files)
        entries = _tree_entries(walk_tree(stage / "lane" / "project", "lane/project"))
        entries += _tree_entries(walk_tree(stage / "work", "work"))
        entries.append(NewcEntry.file("init", render_init(command, env, marker).encode(), 0o755))
        return write_newc(entries)

    # -- running ------------------------------------------------------------

    def qemu_argv(self, config: LaneConfig, initrd: Path) -> list[str]:
        """The full QEMU command line of an L1 boot."""
        return [
            *self.install.argv(), *config.machine_args(), "-accel", "tcg",
            "-bios", str(self.firmware), "-kernel", str(self.kernel.image),
            "-initrd", str(initrd), "-append", APPEND,
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot",
        ]

    async def run(self, command: Sequence[str], config: LaneConfig | None = None, *,
                  files: Sequence[Path] = (), env: Mapping[str, str] | None = None,
                  echo: bool = False) -> LaneResult:
        """Boot L1, run ``command`` in ``/work`` (holding copies of ``files``), power off.

        ``echo`` copies the command's output to our stdout as it arrives.
        Raises LaneError when L1 does not reach the command's end in time.
        """
        config = config or LaneConfig()
        marker = secrets.token_hex(8)
        with tempfile.TemporaryDirectory(prefix="vsmmu-lane-") as tmp:
            initrd = Path(tmp) / "initrd.cpio"
            initrd.write_bytes(self.base_initrd(config) + self.run_initrd(
                command, files, env or {}, marker, Path(tmp) / "stage"))
            return await _boot(self.qemu_argv(config, initrd), self.install.env(), marker,
                               config.timeout, echo)


def _tree_entries(files: Iterable[TreeFile]) -> list[NewcEntry]:
    entries = []
    for item in files:
        if item.target is not None:
            entries.append(NewcEntry.symlink(item.name, item.target))
        elif item.source is None:
            entries.append(NewcEntry.directory(item.name, stat.S_IMODE(item.mode)))
        else:
            entries.append(NewcEntry.file(item.name, item.source.read_bytes(),
                                          stat.S_IMODE(item.mode)))
    return entries


INIT = """\
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root VSMMU_HOST_LANE=1
export PYTHONPATH=/lane/project:/lane/site
cdevs=""
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat $dev/vendor):$(cat $dev/device)" = "{testdev}" ] || continue
    echo vfio-pci > $dev/driver_override
    echo ${{dev##*/}} > /sys/bus/pci/drivers_probe
    cdev=$(ls $dev/vfio-dev 2>/dev/null)
    [ -n "$cdev" ] || {{ echo "LANE: ${{dev##*/}} did not bind to vfio-pci" >&2; continue; }}
    cdevs="$cdevs${{cdevs:+,}}/dev/vfio/devices/$cdev"
done
export VSMMU_VFIO_CDEVS=$cdevs
{env}cd /work
echo "LANE-BEGIN-{marker} $(cut -d' ' -f1 /proc/uptime)"
{command}
echo "LANE-EXIT-{marker} $?"
poweroff -f
"""


def render_init(command: Sequence[str], env: Mapping[str, str], marker: str) -> str:
    """The lane's ``/init``: bind the test devices, run ``command``, report its status."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    return INIT.format(testdev=TESTDEV_VENDOR_DEVICE, env=exports, marker=marker,
                       command=shlex.join(command))


async def console_lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The console's lines, however long (a command may print megabytes on one line,
    which ``StreamReader.readline`` refuses past its 64 KiB limit)."""
    pending = bytearray()
    while chunk := await stream.read(CONSOLE_CHUNK):
        pending += chunk
        start = 0
        while (newline := pending.find(b"\n", start)) >= 0:
            yield bytes(pending[start:newline + 1])
            start = newline + 1
        del pending[:start]
    if pending:
        yield bytes(pending)


async def _boot(argv: list[str], env: dict[str, str], marker: str, timeout: float,
                echo: bool) -> LaneResult:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    console: list[str] = []
    output: list[str] = []
    status: int | None = None
    init_seconds = 0.0
    begin, end = f"LANE-BEGIN-{marker}", f"LANE-EXIT-{marker} "
    inside = False
    try:
        async with asyncio.timeout(timeout):
            async for raw in console_lines(proc.stdout):
                line = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
                console.append(line)
                # The firmware leaves terminal escapes without a newline before /init's
                # first line, so the markers are searched for, not matched at the start.
                if begin in line:
                    inside, init_seconds = True, time.monotonic() - started
                elif end in line:
                    words = line.split(end, 1)[1].split()
                    inside, status = False, int(words[0]) if words else -1
                elif inside:
                    output.append(line)
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
            await proc.wait()
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    transcript = "".join(console)
    if status is None:
        tail = "".join(console[-50:])
        raise LaneError(
            f"L1 did not finish the command within {timeout:.0f}s (QEMU status "
            f"{proc.returncode}); last console lines:\n{tail}")
    return LaneResult(status, "".join(output), transcript, init_seconds,
                      time.monotonic() - started)


def project_files(paths: Sequence[str]) -> list[Path]:
    """The arguments of a command that name existing files here (copied into /work)."""
    return [Path(p) for p in paths if not p.startswith("-") and os.path.isfile(p)]
