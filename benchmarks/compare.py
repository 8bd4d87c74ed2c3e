"""How much benchmark runs differ: ``python -m benchmarks.compare RUN.json RUN.json [...]``.

For every figure (its median) and ratio present in every run, the spread is
``max / min - 1`` over the runs; a spread above the tolerance (default 20%,
the issue's "figures repeat within 20% from run to run") is flagged.  Exit
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
class Spread:
    """One figure or ratio across runs: its values in run order and their spread."""

    key: str
    label: str
    values: tuple[float, ...]

    @property
    def spread(self) -> float:
        """``max / min - 1`` (0 when the runs agree exactly)."""
        return max(self.values) / min(self.values) - 1


def values_of(doc: Any, where: str) -> dict[str, tuple[str, float]]:
    """key -> (label, value) for every figure median and ratio of one run's JSON."""
    try:
        out: dict[str, tuple[str, float]] = {}
        for section in doc["benchmarks"]:
            for fig in section["figures"]:
                out[fig["key"]] = (fig["label"], float(fig["median"]))
            for ratio in section["ratios"]:
                out[ratio["key"]] = (ratio["label"], float(ratio["value"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CompareError(f"{where}: not a benchmark run ({exc!r}); expected the JSON "
                           "python -m benchmarks writes") from exc
    return out


def spreads(runs: Sequence[dict[str, tuple[str, float]]]) -> list[Spread]:
    """The spread of every key present (with a positive value) in all ``runs``, in order."""
    if not runs:
        return []
    common = [key for key in runs[0] if all(key in run for run in runs[1:])]
    out = []
    for key in common:
        values = tuple(run[key][1] for run in runs)
        if min(values) > 0:
            out.append(Spread(key, runs[0][key][0], values))
    return out


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: {exc}") from exc


def load(path: Path) -> dict[str, tuple[str, float]]:
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
        over = row.spread > tolerance
        if only_over and not over:
            continue
        shown = " / ".join(f"{value:.4g}" for value in row.values)
        lines.append(f"| {row.key}: {row.label} | {shown} | {row.spread:.1%} | "
                     f"{'over ' + format(tolerance, '.0%') if over else 'ok'} |")
    return "\n".join(lines)


def summary(rows: Sequence[Spread], tolerance: float) -> str:
    """One line: how many figures, the largest spread and how many exceed ``tolerance``."""
    if not rows:
        return "no figure in common"
    worst = max(rows, key=lambda row: row.spread)
    over = sum(1 for row in rows if row.spread > tolerance)
    return (f"{len(rows)} figures and ratios; largest spread {worst.spread:.1%} ({worst.key}); "
            f"{over} over {tolerance:.0%}")


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
