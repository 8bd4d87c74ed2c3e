"""Command line: ``python -m benchmarks --cache .cache [--quick] [--only B4,B5] [--json PATH]``.

Runs the chosen benchmarks in one process, prints one table and writes the
JSON file.  Exit status 0 when every chosen benchmark produced its figures
or said why it could not; 1 when one of them failed (a broken path).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import b1b2_dma, b3_trap, b4_commands, b5_translation
from benchmarks.report import (
    BenchmarkError,
    Section,
    Settings,
    environment,
    render_table,
    write_json,
)

logger = logging.getLogger(__name__)

DEFAULT_REPEATS = 5


def _one(run: Callable[[Settings], Section]) -> Callable[[Settings], list[Section]]:
    return lambda settings: [run(settings)]


GROUPS: list[tuple[tuple[str, ...], Callable[[Settings], list[Section]]]] = [
    (("B4",), _one(b4_commands.run)),
    (("B5",), _one(b5_translation.run)),
    (("B1", "B2"), b1b2_dma.run),
    (("B3",), _one(b3_trap.run)),
]
"""Benchmark ids and the function measuring them (B1 and B2 share their boots), in the
order they run: the in-process ones first, before any guest has run, because a QEMU
that is still being torn down slowed the first B4 samples by a third."""
BENCHMARKS = sorted(bench_id for ids, _run in GROUPS for bench_id in ids)


def _parse_only(text: str) -> list[str]:
    chosen = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    return chosen


def run_benchmarks(settings: Settings, chosen: list[str]) -> tuple[list[Section], list[str]]:
    """Run ``chosen`` benchmarks; return their sections and the failures (as messages)."""
    sections: list[Section] = []
    failures: list[str] = []
    for ids, run in GROUPS:
        wanted = [i for i in ids if i in chosen]
        if not wanted:
            continue
        start = time.monotonic()
        logger.info("running %s", "+".join(wanted))
        try:
            sections += [s for s in run(settings) if s.bench_id in wanted]
        except BenchmarkError as exc:
            failures.append(f"{'+'.join(wanted)}: {exc}")
            for bench_id in wanted:
                failed = Section(bench_id, "failed")
                failed.missing(bench_id, bench_id, f"failed: {str(exc).splitlines()[0]}")
                sections.append(failed)
        logger.info("%s took %.1f s", "+".join(wanted), time.monotonic() - start)
    sections.sort(key=lambda section: BENCHMARKS.index(section.bench_id))
    return sections, failures


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"),
                        help="the provisioned cache (QEMU, guest kernel)")
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, smallest sizes (a smoke run, not a measurement)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"samples per figure (default {DEFAULT_REPEATS}, 1 with --quick)")
    parser.add_argument("--only", type=_parse_only, default=list(BENCHMARKS),
                        help="comma-separated benchmark ids, e.g. B4,B5")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the JSON (default <cache>/bench/results.json)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else DEFAULT_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats {repeats}: expected at least 1")
    settings = Settings(cache=args.cache, repeats=repeats, quick=args.quick)
    started = time.monotonic()
    sections, failures = run_benchmarks(settings, args.only)
    env = environment(args.cache)
    table = render_table(sections, env, settings)
    print(table)
    json_path = args.json if args.json is not None else args.cache / "bench" / "results.json"
    write_json(json_path, sections, env, settings)
    print(f"\n{time.monotonic() - started:.0f} s; JSON written to {json_path}")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0
