"""Command line: ``python -m benchmarks --cache .cache [--quick] [--only B4,B5] [--json PATH]``.

Runs the chosen benchmarks in one process, round by round, prints one table and writes the
JSON file; the file it replaces is kept as ``<name>.previous.json`` and the
new run is compared with it (:mod:`benchmarks.compare`).  Exit status 0 when
every chosen benchmark produced its figures or said why it could not; 1 when
one of them failed (a broken path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

from benchmarks import b1b2_dma, b3_trap, b4_commands, b5_translation, b6_scaling, compare
from benchmarks.report import (
    BenchmarkError,
    RoundBenchmark,
    Section,
    Settings,
    environment,
    render_table,
    write_json,
)
from guest_images.cache import default_cache

logger = logging.getLogger(__name__)

DEFAULT_REPEATS = 9


BENCHMARK_CLASSES: list[type[RoundBenchmark]] = [
    b4_commands.CommandBenchmark,
    b5_translation.TranslationBenchmark,
    b6_scaling.ScalingBenchmark,
    b1b2_dma.DmaBenchmark,
    b3_trap.TrapBenchmark,
]
"""Every benchmark (B1 and B2 share their boots), in the order each round runs them: the
in-process ones first, each after a short discarded warm-up, then the guests."""
BENCHMARKS = sorted(bench_id for cls in BENCHMARK_CLASSES for bench_id in cls.ids)


def _parse_only(text: str) -> list[str]:
    by_upper = {bench_id.upper(): bench_id for bench_id in BENCHMARKS}
    chosen = [by_upper.get(part.strip().upper(), part.strip())
              for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    return chosen


async def _run_rounds(settings: Settings, chosen: list[str]
                      ) -> tuple[list[Section], list[str]]:
    benches: list[tuple[list[str], RoundBenchmark]] = []
    sections: list[Section] = []
    failures: list[str] = []

    def failed(ids: list[str], exc: BenchmarkError) -> None:
        failures.append(f"{'+'.join(ids)}: {exc}")
        for bench_id in ids:
            section = Section(bench_id, "failed")
            section.missing(bench_id, bench_id, f"failed: {str(exc).splitlines()[0]}")
            sections.append(section)

    for cls in BENCHMARK_CLASSES:
        wanted = [i for i in cls.ids if i in chosen]
        if not wanted:
            continue
        try:
            benches.append((wanted, cls(settings)))
        except BenchmarkError as exc:
            failed(wanted, exc)
    for index in range(settings.repeats):
        for wanted, bench in list(benches):
            start = time.monotonic()
            try:
                await bench.round(index)
            except BenchmarkError as exc:
                failed(wanted, exc)
                benches.remove((wanted, bench))
            logger.info("%s round %d took %.1f s", "+".join(wanted), index,
                        time.monotonic() - start)
    for wanted, bench in benches:
        sections += [s for s in bench.sections() if s.bench_id in wanted]
    return sections, failures


def run_benchmarks(settings: Settings, chosen: list[str]) -> tuple[list[Section], list[str]]:
    """Run ``chosen`` benchmarks round by round; return their sections and the failures.

    Round ``i`` takes sample ``i`` of every chosen benchmark before round ``i + 1``
    starts (:class:`~benchmarks.report.RoundBenchmark` says why).
    """
    sections, failures = asyncio.run(_run_rounds(settings, chosen))
    sections.sort(key=lambda section: BENCHMARKS.index(section.bench_id))
    return sections, failures


def _previous_run(json_path: Path) -> Path | None:
    """Keep the run at ``json_path`` (if any) as ``<name>.previous.json``; return that path."""
    if not json_path.is_file():
        return None
    previous = json_path.with_suffix(".previous.json")
    json_path.replace(previous)
    return previous


def _print_repeatability(previous: Path, current: Path) -> None:
    try:
        if compare.was_quick(previous):
            return  # a smoke run's figures say nothing about repeatability
        rows = compare.spreads([compare.load(previous), compare.load(current)])
    except compare.CompareError as exc:
        print(f"not compared with the previous run: {exc}")
        return
    tolerance = compare.DEFAULT_TOLERANCE
    print(f"Against the previous run ({previous}): {compare.summary(rows, tolerance)}")
    if any(row.spread > tolerance for row in rows):
        print(compare.render(rows, tolerance, only_over=True))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache(),
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
    previous = _previous_run(json_path)
    write_json(json_path, sections, env, settings)
    print(f"\n{time.monotonic() - started:.0f} s; JSON written to {json_path}")
    if previous is not None and not settings.quick:
        _print_repeatability(previous, json_path)
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0
