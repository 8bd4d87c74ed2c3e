"""``python -m reliability soak|probe``: the soak (``make soak``) and long probe runs.

* ``soak [--minutes N] [--kill-every S]``: :mod:`reliability.soak` (needs the
  QEMU and guest the cache provides; ``make soak`` sets them up first).
* ``probe [--vfio-messages N] [--qmp-messages N] [--register-writes N]``: the
  three probes of :mod:`reliability.probes` against a fresh ``vsmmu serve``,
  with its descriptor count, RSS and objects compared before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from guest_images.kernel import DEFAULT_SUITE, ensure_guest
from qmp_harness.provision import ensure_qemu
from reliability.service import ServiceProcess, run_probes
from reliability.soak import Soak

DEFAULT_MINUTES = 10.0
DEFAULT_KILL_EVERY_S = 45.0


async def _probe(args: argparse.Namespace) -> int:
    async with ServiceProcess() as service:
        report = await run_probes(service, vfio_messages=args.vfio_messages,
                                  qmp_messages=args.qmp_messages,
                                  register_writes=args.register_writes, seed=args.seed,
                                  rounds=args.rounds)
    for line in report.lines():
        print(line, flush=True)
    hung = report.vfio.hung + report.qmp.hung + report.registers.hung
    ok = (report.alive and not hung and not report.objects_left and not report.tracebacks)
    print("VERDICT:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


async def _soak(args: argparse.Namespace) -> int:
    qemu = ensure_qemu(args.cache, quiet=True)
    guest = ensure_guest(args.cache, args.suite, quiet=True)
    soak = Soak(qemu, guest, args.cache, minutes=args.minutes, kill_every_s=args.kill_every)
    return await soak.run()


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    soak = sub.add_parser("soak", help="a guest DMAs while the service is attacked")
    soak.add_argument("--cache", type=Path, required=True)
    soak.add_argument("--suite", default=os.environ.get("VSMMU_GUEST_SUITE", DEFAULT_SUITE))
    soak.add_argument("--minutes", type=float,
                      default=float(os.environ.get("SOAK_MINUTES", DEFAULT_MINUTES)))
    soak.add_argument("--kill-every", type=float, default=DEFAULT_KILL_EVERY_S,
                      help="seconds of guest DMA between QEMU kills")
    probe = sub.add_parser("probe", help="the probes against a fresh service")
    probe.add_argument("--vfio-messages", type=int, default=100_000)
    probe.add_argument("--qmp-messages", type=int, default=20_000)
    probe.add_argument("--register-writes", type=int, default=100_000)
    probe.add_argument("--rounds", type=int, default=10)
    probe.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "soak":
        return asyncio.run(_soak(args))
    return asyncio.run(_probe(args))


if __name__ == "__main__":
    sys.exit(main())
