"""Command-line entry point: ``vsmmu serve``, ``vsmmu demo``, ``vsmmu doctor``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from vsmmu.endpoints.base import EndpointError
from vsmmu.iommufd.sim import HostPersonality
from vsmmu.logging_limit import limit_log_rate
from vsmmu.nesting import CBadStePolicy
from vsmmu.service import BackendKind, EndpointConfig, ServiceConfig, ServiceError, serve
from vsmmu.smmu import SmmuFeatures

log = logging.getLogger(__name__)


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
        cmd.add_argument("--cache", type=Path, default=None,
                         help="the provisioned cache (default: $VSMMU_CACHE, else the per-user "
                              "cache)")
        cmd.add_argument("--suite", default=None,
                         help="Debian suite of the guest kernel (default: the default guest's)")
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
    # Imported here: ``vsmmu serve`` needs neither the harness nor the guest image builder.
    from vsmmu.demo_cli import run_host_command
    return run_host_command(args.command, args.cache, args.suite)


if __name__ == "__main__":
    sys.exit(main())
