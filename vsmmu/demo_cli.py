"""``vsmmu doctor`` and ``vsmmu demo``: the commands that provision and boot a guest.

Kept apart from :mod:`vsmmu.cli` so that ``vsmmu serve`` imports neither the
harness (:mod:`qmp_harness`) nor the guest image builder (:mod:`guest_images`).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import DebianArchiveError
from guest_images.kernel import DEFAULT_SUITE, GuestImageError, ensure_guest, load_guest
from qmp_harness.machine import BootError
from qmp_harness.provision import ProvisionError, ensure_qemu, load_install
from vsmmu.demo import DmaCheckError

MEMFD_BACKEND = "memory-backend-memfd"
VFIO_USER_DEVICE = "vfio-user-pci"


def run_host_command(command: str, cache: Path | None, suite: str | None) -> int:
    """Run ``doctor`` or ``demo`` (defaults: the per-user cache, the default suite)."""
    cache = cache if cache is not None else default_cache()
    suite = suite if suite is not None else DEFAULT_SUITE
    try:
        if command == "doctor":
            return doctor(cache, suite)
        if command == "demo":
            ensure_qemu(cache, quiet=True)
            ensure_guest(cache, suite, quiet=True)
            return asyncio.run(_demo(cache, suite))
    except (ProvisionError, GuestImageError, DebianArchiveError, BootError,
            DmaCheckError) as exc:
        print(f"vsmmu {command}: {exc}", file=sys.stderr)
        return 1
    print(f"vsmmu: {command} is not a host command", file=sys.stderr)
    return 2


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def doctor(cache: Path, suite: str) -> int:
    """Print what this machine offers vsmmu; return 0 when everything needed is there."""
    cache = cache.resolve()
    print(f"cache:                {cache}")
    install = load_install(cache)
    if install is None:
        print("QEMU:                 not provisioned (run `make setup`)")
        ok = False
    else:
        devices = install.device_help()
        objects = install.object_help()
        has_vfio_user = f'name "{VFIO_USER_DEVICE}"' in devices
        has_memfd = MEMFD_BACKEND in objects.split()
        print(f"QEMU:                 {install.version} ({install.suite}, {install.prefix})")
        print(f"  {VFIO_USER_DEVICE}:      {_mark(has_vfio_user)}")
        print(f"  {MEMFD_BACKEND}: {_mark(has_memfd)}")
        ok = has_vfio_user and has_memfd
    guest = load_guest(cache, suite)
    if guest is None:
        print(f"guest kernel:         not provisioned for {suite} (run `make setup`)")
        ok = False
    else:
        print(f"guest kernel:         {guest.release} ({suite}, {guest.image})")
    print(f"/dev/kvm:             {_mark(Path('/dev/kvm').exists())} (not required; TCG is used)")
    return 0 if ok else 1


async def _demo(cache: Path, suite: str) -> int:
    # Imported here: the fixtures module imports pytest, which a plain CLI run
    # should not need until it boots something.
    from qmp_harness.fixtures import provision_environment
    from vsmmu.demo import run_demo

    env = provision_environment(cache.resolve(), suite)
    return await run_demo(env.qemu, env.guest, env.cache)
