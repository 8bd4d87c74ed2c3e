"""``python -m qmp_harness.host_lane run [options] -- COMMAND...``: run a command in L1.

``setup`` provisions the lane (QEMU, firmware, the host kernel build, Python)
and boots nothing.  ``run`` boots L1, runs COMMAND in /work, prints its output
as it arrives and exits with its status.  Arguments of COMMAND naming files
here (``my_script.py``) are copied into /work; ``--file`` adds others.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from guest_images.debian import DebianArchiveError
from guest_images.host_kernel import HostKernelError
from qmp_harness.host_lane.fwcfg import FwCfgError
from qmp_harness.host_lane.iort import IortError
from qmp_harness.host_lane.lane import (
    DEFAULT_TIMEOUT,
    HostLane,
    LaneConfig,
    LaneError,
    project_files,
)
from qmp_harness.host_lane.userland import UserlandError
from qmp_harness.provision import ProvisionError

LANE_ERRORS = (LaneError, HostKernelError, DebianArchiveError, FwCfgError, IortError,
               UserlandError, ProvisionError)
LANE_FAILED = 125
"""Our exit status when the lane itself failed (not the command)."""


def main(argv: list[str] | None = None) -> int:
    """Provision the lane, or run a command in it and return the command's status."""
    parser = argparse.ArgumentParser(prog="python -m qmp_harness.host_lane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="default: the per-user cache")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help="provision the lane (builds the kernel once)")
    run = sub.add_parser("run", help="run COMMAND in L1")
    run.add_argument("--testdevs", type=int, default=LaneConfig.testdevs,
                     help="iommu-testdev functions bound to vfio-pci (default %(default)s)")
    run.add_argument("--file", type=Path, action="append", default=[],
                     help="also copy this file or directory into /work")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                     help="seconds before L1 is killed (default %(default)s)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [c for c in getattr(args, "command", [])]
    if command[:1] == ["--"]:
        command = command[1:]
    if args.action == "run" and not command:
        parser.error("run needs a COMMAND after --")
    try:
        lane = HostLane.provision(args.cache)
        if args.action == "setup":
            print(f"host lane ready: kernel {lane.kernel.image}")
            return 0
        config = LaneConfig(testdevs=args.testdevs, timeout=args.timeout)
        files = [*project_files(command), *args.file]
        result = asyncio.run(lane.run(command, config, files=files, echo=True))
    except LANE_ERRORS as exc:
        print(f"host_lane: {exc}", file=sys.stderr)
        return LANE_FAILED
    print(f"host_lane: status {result.status}, /init after {result.init_seconds:.1f}s, "
          f"{result.wall_seconds:.1f}s in all", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
