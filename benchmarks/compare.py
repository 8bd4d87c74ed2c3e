"""How much benchmark runs differ: ``python -m benchmarks.compare RUN.json RUN.json [...]``.

For every figure (its median) and ratio present in every run, the spread is
``max / min - 1`` over the runs; a spread above the tolerance (default 20%,
the issue's "figures repeat within 20% from run to run") is flagged, and a
flagged figure whose ratios all held is marked as a shift of the host (both
sides of the comparison moved together).  Exit
status 0 when every spread is within the tolerance, 1 otherwise, 2 when the
files cannot be compared.  ``python -m benchmarks`` also compares each run
with the one before it (the previous JSON file at the same path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.20


class CompareError(ValueError):
    """A file is not a benchmark run this tool can read."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's values: key -> (label, value) for every figure median and ratio, and
    each ratio's (numerator, denominator) figure keys."""

    values: dict[str, tuple[str, float]]
    ratio_parts: dict[str, tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Spread:
    """One figure or ratio across runs: its values in run order and their spread.

    ``ratios`` holds the spreads of the ratios a figure takes part in (empty for a
    ratio): when a figure moved more than the tolerance but every one of its ratios
    held, the host's speed moved both sides of the comparison.
    """

    key: str
    label: str
    values: tuple[float, ...]
    ratios: tuple[Spread, ...] = ()

    @property
    def spread(self) -> float:
        """``max / min - 1`` (0 when the runs agree exactly)."""
        return max(self.values) / min(self.values) - 1

    def verdict(self, tolerance: float) -> str:
        """"ok", or "over" plus, when every ratio of the figure held, which ones."""
        if self.spread <= tolerance:
            return "ok"
        over = f"over {tolerance:.0%}"
        if self.ratios and all(r.spread <= tolerance for r in self.ratios):
            held = ", ".join(f"{r.key} {r.spread:.1%}" for r in self.ratios)
            return f"{over}; its ratios held ({held}): the host moved both sides"
        return over


def values_of(doc: Any, where: str) -> Run:
    """The figure medians, ratios and ratio parts of one run's JSON."""
    try:
        values: dict[str, tuple[str, float]] = {}
        parts: dict[str, tuple[str, str]] = {}
        for section in doc["benchmarks"]:
            for fig in section["figures"]:
                values[fig["key"]] = (fig["label"], float(fig["median"]))
            for ratio in section["ratios"]:
                values[ratio["key"]] = (ratio["label"], float(ratio["value"]))
                if "numerator" in ratio and "denominator" in ratio:
                    parts[ratio["key"]] = (str(ratio["numerator"]), str(ratio["denominator"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CompareError(f"{where}: not a benchmark run ({exc!r}); expected the JSON "
                           "python -m benchmarks writes") from exc
    return Run(values, parts)


def spreads(runs: Sequence[Run]) -> list[Spread]:
    """The spread of every key present (with a positive value) in all ``runs``, in order;
    each figure's spread carries those of the ratios it takes part in."""
    if not runs:
        return []
    common = [key for key in runs[0].values if all(key in run.values for run in runs[1:])]
    plain: dict[str, Spread] = {}
    for key in common:
        values = tuple(run.values[key][1] for run in runs)
        if min(values) > 0:
            plain[key] = Spread(key, runs[0].values[key][0], values)
    parts = runs[0].ratio_parts
    out = []
    for key, row in plain.items():
        mine = tuple(plain[ratio] for ratio, sides in parts.items()
                     if key in sides and ratio in plain)
        out.append(dataclasses.replace(row, ratios=mine))
    return out


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: {exc}") from exc


def load(path: Path) -> Run:
    """The values of the run stored at ``path``."""
    return values_of(_read(path), str(path))


def was_quick(path: Path) -> bool:
    """Whether the run at ``path`` was a ``--quick`` smoke run."""
    doc = _read(path)
    settings = doc.get("settings") if isinstance(doc, dict) else None
    return isinstance(settings, dict) and bool(settings.get("quick"))


def render(rows: Sequence[Spread], tolerance: float, *, only_over: bool = False) -> str:
    """A Markdown table of the spreads (all of them, or those over ``tolerance``)."""
    lines = ["| figure | values, run by run | spread | |", "|---|---|---|---|"]
    for row in rows:
        if only_over and row.spread <= tolerance:
            continue
        shown = " / ".join(f"{value:.4g}" for value in row.values)
        lines.append(f"| {row.key}: {row.label} | {shown} | {row.spread:.1%} | "
                     f"{row.verdict(tolerance)} |")
    return "\n".join(lines)


def summary(rows: Sequence[Spread], tolerance: float) -> str:
    """One line: how many figures, the largest spread and how many exceed ``tolerance``."""
    if not rows:
        return "no figure in common"
    worst = max(rows, key=lambda row: row.spread)
    over = [row for row in rows if row.spread > tolerance]
    host = sum(1 for row in over if row.verdict(tolerance) != f"over {tolerance:.0%}")
    return (f"{len(rows)} figures and ratios; largest spread {worst.spread:.1%} ({worst.key}); "
            f"{len(over)} over {tolerance:.0%}"
            + (f" ({host} of them with every ratio held)" if host else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.compare``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of python -m benchmarks")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest acceptable spread (default {DEFAULT_TOLERANCE})")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("expected at least two runs to compare")
    try:
        rows = spreads([load(path) for path in args.runs])
    except CompareError as exc:
        print(f"error: {exc}")
        return 2
    print(render(rows, args.tolerance))
    print()
    print(summary(rows, args.tolerance))
    return 0 if rows and all(row.spread <= args.tolerance for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
