"""Interleaved sampling and the run-to-run comparison of benchmark results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import cli, compare
from benchmarks.cli import main
from benchmarks.report import (
    BenchmarkError,
    Figure,
    Ratio,
    RoundBenchmark,
    Section,
    Settings,
    round_order,
    sample_round,
)

FIVE = Settings(cache=Path(".cache"), repeats=5)


def test_round_order_rotates_so_no_figure_always_goes_first() -> None:
    orders = [round_order(r, 3) for r in range(3)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert {order[0] for order in orders} == {0, 1, 2}


def _recording(calls: list[str], name: str) -> Any:
    def sample() -> float:
        calls.append(name)
        return float(len(calls))
    return sample


def test_sample_round_takes_one_sample_each_in_rotated_order() -> None:
    calls: list[str] = []
    samplers = [_recording(calls, "ours"), _recording(calls, "base")]
    first = sample_round(FIVE, 0, samplers, warmup_s=0)
    second = sample_round(FIVE, 1, samplers, warmup_s=0)
    assert calls == ["ours", "base", "base", "ours"]
    # Samples come back in sampler order, whatever order they were taken in.
    assert first == [1.0, 2.0] and second == [4.0, 3.0]


def test_sample_round_warmup_samples_are_discarded() -> None:
    calls: list[str] = []
    (taken,) = sample_round(FIVE, 0, [_recording(calls, "x")], warmup_s=0.01)
    assert len(calls) > 1 and taken == float(len(calls))


class _Recorder(RoundBenchmark):
    """A benchmark that logs its rounds into a shared list (and can fail on one)."""

    def __init__(self, settings: Settings, bench_id: str, log: list[str],
                 fail_at: int | None = None) -> None:
        super().__init__(settings)
        self.ids = (bench_id,)
        self.log, self.fail_at, self.samples = log, fail_at, list[float]()

    async def round(self, index: int) -> None:
        self.log.append(f"{self.ids[0]}:{index}")
        if index == self.fail_at:
            raise BenchmarkError("path broke")
        self.samples.append(1.0 + index)

    def sections(self) -> list[Section]:
        section = Section(self.ids[0], "recorder")
        section.figure(f"{self.ids[0]}.x", "x", "u", self.samples, higher_is_better=True)
        return [section]


def test_cli_runs_every_benchmark_round_by_round_and_drops_a_broken_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []

    def make(bench_id: str, fail_at: int | None = None) -> type[RoundBenchmark]:
        class One(_Recorder):
            ids = (bench_id,)

            def __init__(self, settings: Settings) -> None:
                super().__init__(settings, bench_id, log, fail_at)
        return One

    monkeypatch.setattr(cli, "BENCHMARK_CLASSES", [make("B4"), make("B5", fail_at=1)])
    monkeypatch.setattr(cli, "BENCHMARKS", ["B4", "B5"])
    sections, failures = cli.run_benchmarks(Settings(cache=Path("."), repeats=3), ["B4", "B5"])
    assert log == ["B4:0", "B5:0", "B4:1", "B5:1", "B4:2"]
    assert failures == ["B5: path broke"]
    b4, b5 = sections
    assert b4.figures[0].samples == [1.0, 2.0, 3.0]
    assert b5.not_measured[0].reason == "failed: path broke"


def _run(path: Path, values: dict[str, float], *, quick: bool = False) -> Path:
    figures = [{"key": k, "label": k, "median": v} for k, v in values.items()
               if not k.endswith("ratio")]
    ratios = [{"key": k, "label": k, "value": v, "numerator": k.removesuffix("_ratio"),
               "denominator": "B4.base"} for k, v in values.items() if k.endswith("ratio")]
    path.write_text(json.dumps({"settings": {"quick": quick, "repeats": 5},
                                "benchmarks": [{"figures": figures, "ratios": ratios}]}))
    return path


def test_compare_flags_only_figures_beyond_the_tolerance(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    a = _run(tmp_path / "a.json", {"B4.x": 100.0, "B4.y": 10.0, "B4.x_ratio": 0.5})
    b = _run(tmp_path / "b.json", {"B4.x": 115.0, "B4.y": 13.0, "B4.x_ratio": 0.5,
                                   "B5.only_here": 1.0})
    rows = compare.spreads([compare.load(a), compare.load(b)])
    assert [row.key for row in rows] == ["B4.x", "B4.y", "B4.x_ratio"]
    assert [round(row.spread, 3) for row in rows] == [0.15, 0.3, 0.0]
    assert compare.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "largest spread 30.0% (B4.y); 1 over 20%\n" in out
    assert compare.main([str(a), str(b), "--tolerance", "0.35"]) == 0


def test_compare_marks_a_figure_whose_ratios_held_as_a_host_shift(tmp_path: Path) -> None:
    # Ours and its baseline both 30% slower in run b: the figures move, the ratio holds.
    a = _run(tmp_path / "a.json", {"B4.x": 100.0, "B4.base": 200.0, "B4.x_ratio": 0.5})
    b = _run(tmp_path / "b.json", {"B4.x": 70.0, "B4.base": 140.0, "B4.x_ratio": 0.5})
    rows = {row.key: row for row in compare.spreads([compare.load(a), compare.load(b)])}
    assert [r.key for r in rows["B4.x"].ratios] == ["B4.x_ratio"]
    assert "its ratios held (B4.x_ratio 0.0%)" in rows["B4.x"].verdict(0.2)
    assert "held" in rows["B4.base"].verdict(0.2)
    assert compare.summary(list(rows.values()), 0.2).endswith(
        "2 over 20% (2 of them with every ratio held)")
    # When the ratio moves too, the figure is plainly over.
    c = _run(tmp_path / "c.json", {"B4.x": 70.0, "B4.base": 200.0, "B4.x_ratio": 0.35})
    rows = {row.key: row for row in compare.spreads([compare.load(a), compare.load(c)])}
    assert rows["B4.x"].verdict(0.2) == "over 20%"


def test_compare_refuses_a_file_that_is_not_a_run(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(tmp_path / "a.json", {"B4.x": 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": [{"figures": [{"key": "B4.x"}]}]}')
    assert compare.main([str(a), str(bad)]) == 2
    assert "not a benchmark run" in capsys.readouterr().out


def test_cli_keeps_the_previous_run_and_compares_with_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = ["--cache", str(tmp_path), "--only", "B4", "--repeats", "1", "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert "Against the previous run" not in capsys.readouterr().out
    assert main(args) == 0
    previous = tmp_path / "bench.previous.json"
    assert json.loads(previous.read_text()) == first
    assert "Against the previous run" in capsys.readouterr().out


def test_ratio_pairs_samples_of_the_same_round() -> None:
    ours = Figure("B0.ours", "ours", "u", [10.0, 20.0, 30.0], higher_is_better=True)
    base = Figure("B0.base", "base", "u", [10.0, 10.0, 30.0], higher_is_better=True)
    # Per round 1, 2, 1: the slow second baseline sample moves one pair, not the result.
    paired = Ratio("B0.ratio", "ours / base", ours, base)
    assert paired.paired and paired.value == 1.0
    assert paired.to_json()["method"] == "median of paired ratios"
    uneven = Figure("B0.base2", "base", "u", [10.0, 30.0], higher_is_better=True)
    medians = Ratio("B0.ratio2", "ours / base", ours, uneven)
    assert not medians.paired and medians.value == 20.0 / 20.0
