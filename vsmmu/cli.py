"""Command-line entry point: ``vsmmu serve``, ``vsmmu demo``, ``vsmmu doctor``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return the exit status."""
    parser = argparse.ArgumentParser(prog="vsmmu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="print what this machine offers vsmmu")
    args = parser.parse_args(argv)
    print(f"vsmmu: {args.command} is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
