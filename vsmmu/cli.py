"""Command-line entry point: ``vsmmu serve``, ``vsmmu demo``, ``vsmmu doctor``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import DebianArchiveError
from guest_images.kernel import DEFAULT_SUITE, GuestImageError, ensure_guest, load_guest
from qmp_harness.machine import BootError
from qmp_harness.provision import ProvisionError, ensure_qemu, load_install
from vsmmu.demo import DmaCheckError
from vsmmu.endpoints.base import EndpointError
from vsmmu.iommufd.sim import HostPersonality
from vsmmu.logging_limit import limit_log_rate
from vsmmu.nesting import CBadStePolicy
from vsmmu.service import BackendKind, EndpointConfig, ServiceConfig, ServiceError, serve
from vsmmu.smmu import SmmuFeatures

log = logging.getLogger(__name__)

DEFAULT_CACHE = default_cache()
MEMFD_BACKEND = "memory-backend-memfd"
VFIO_USER_DEVICE = "vfio-user-pci"


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


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("serve", help="run the vSMMU service (vfio-user functions + QMP)")
    cmd.add_argument("--socket-dir", type=Path, required=True,
                     help="directory for the vfio-user sockets (smmu.sock, <endpoint>.sock)")
    cmd.add_argument("--qmp", type=Path, default=None,
                     help="QMP socket path (default: <socket-dir>/qmp.sock)")
    cmd.add_argument("--endpoint", action="append", default=[], metavar="SPEC",
                     help="an endpoint behind the vSMMU, e.g. virtio-rng,sid=0x10 (repeatable)")
    cmd.add_argument("--backend", choices=[b.value for b in BackendKind], default="sim")
    cmd.add_argument("--host-no-ats-nested", action="store_true",
                     help="sim host refuses a vSTE with EATS!=0 (HWPT_ALLOC fails with EIO)")
    cmd.add_argument("--host-no-nesting", action="store_true",
                     help="sim host SMMU without nesting support")
    cmd.add_argument("--ats", action="store_true", help="the vSMMU advertises ATS")
    cmd.add_argument("--ril", action="store_true", help="the vSMMU advertises range invalidation")
    cmd.add_argument("--no-msi", action="store_true",
                     help="the vSMMU does not advertise IDR0.MSI (the guest then polls CMDQ_CONS "
                          "after each CMD_SYNC)")
    cmd.add_argument("--cbadste-policy", choices=[p.value for p in CBadStePolicy],
                     default=CBadStePolicy.EVENT.value,
                     help="how a guest STE the host refuses is reported (see vsmmu.nesting.policy)")
    cmd.add_argument("--exit-on-disconnect", action="store_true",
                     help="exit when QEMU disconnects from the SMMU function")
    cmd.add_argument("--sanitize", action="store_true",
                     help="report guest driver mistakes as VSMMU_GUEST_ERROR (README)")
    cmd.add_argument("--trace", action="store_true",
                     help="log every register access, command and iommufd call")
    cmd.add_argument("--log-level", choices=["debug", "info", "warning"], default="warning",
                     help="logging level (--trace implies at least info)")


def _serve_config(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        socket_dir=args.socket_dir,
        qmp_socket=args.qmp,
        endpoints=[EndpointConfig.parse(text) for text in args.endpoint],
        backend=BackendKind(args.backend),
        host=HostPersonality(ats_in_nested=not args.host_no_ats_nested,
                             nesting=not args.host_no_nesting),
        features=SmmuFeatures(ats=args.ats, ril=args.ril, msi=not args.no_msi),
        cbadste_policy=CBadStePolicy(args.cbadste_policy),
        trace=args.trace,
        exit_on_disconnect=args.exit_on_disconnect,
        sanitize=args.sanitize,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return the exit status."""
    parser = argparse.ArgumentParser(prog="vsmmu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("doctor", "print what this machine offers vsmmu"),
        ("demo", "boot the guest with the nested vSMMU and show probe, DMA and objects"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
        cmd.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite of the guest kernel")
    _add_serve_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        level = getattr(logging, args.log_level.upper())
        logging.basicConfig(level=min(level, logging.INFO) if args.trace else level,
                            format="%(asctime)s %(name)s: %(message)s")
        if not args.trace:  # --trace asks for every line; otherwise guests cannot flood
            limit_log_rate()
        try:
            return asyncio.run(serve(_serve_config(args)))
        except (ServiceError, EndpointError, OSError) as exc:
            print(f"vsmmu serve: {exc}", file=sys.stderr)
            return 1
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "doctor":
            return doctor(args.cache, args.suite)
        if args.command == "demo":
            ensure_qemu(args.cache, quiet=True)
            ensure_guest(args.cache, args.suite, quiet=True)
            return asyncio.run(_demo(args.cache, args.suite))
    except (ProvisionError, GuestImageError, DebianArchiveError, BootError,
            DmaCheckError) as exc:
        print(f"vsmmu {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"vsmmu: {args.command} is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
