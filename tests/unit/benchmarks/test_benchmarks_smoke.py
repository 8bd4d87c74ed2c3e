"""Smoke run of the benchmarks: one repeat, smallest sizes; figures must be sane.

Not a measurement: it fails when a benchmark's path breaks (an exception, a
stopped command queue, a walk where a hit was expected, a zero figure), not
when it is slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import b4_commands, b5_translation, b6_scaling
from benchmarks.cli import main
from benchmarks.report import TARGETS, BenchmarkError, Figure, Settings

pytestmark = pytest.mark.bench_smoke

QUICK = Settings(cache=Path(".cache"), repeats=1, quick=True)


def _values(doc: Any) -> dict[str, Any]:
    sections = doc["benchmarks"]
    assert isinstance(sections, list)
    return {f["key"]: f for s in sections for f in s["figures"]}


def test_cli_quick_b4_b5_writes_sane_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "bench.json"
    assert main(["--cache", str(tmp_path), "--quick", "--only", "B4,B5",
                 "--json", str(out)]) == 0
    doc: Any = json.loads(out.read_text())
    figures = _values(doc)
    for key in ("B4.tlbi_nh_va", "B4.cfgi_ste", "B4.tlbi_nh_va_null", "B5.hit_8", "B5.miss_8",
                "B5.copy_8"):
        fig = figures[key]
        assert fig["unit"] and len(fig["samples"]) == 1
        assert 0 < fig["min"] <= fig["median"] < float("inf")
    # A walk costs more than a hit; the model alone is not slower than model + translator.
    assert figures["B5.miss_8"]["median"] < figures["B5.hit_8"]["median"]
    ratios = {r["key"]: r["value"] for s in doc["benchmarks"] for r in s["ratios"]}
    assert ratios["B4.tlbi_nh_va_ratio"] > 0 and ratios["B5.hit_8_ratio"] > 0
    env = doc["environment"]
    assert env["cores"] >= 1 and env["python"]
    statuses = {t["subject"]: t["status"] for t in doc["targets"]}
    assert len(statuses) == len(TARGETS)
    assert statuses["B4.tlbi_nh_va_ratio"] in ("met", "not met")
    assert statuses["B1.ratio"] == "not measured", "B1 was not chosen"
    table = capsys.readouterr().out
    assert "| B4 | TLBI_NH_VA+CMD_SYNC" in table and "| B5 | IOTLB hit" in table


def test_b4_stopped_queue_is_an_error_not_a_figure() -> None:
    rig = b4_commands.CommandRig(b4_commands._null_sink,
                                 b"\xff" * 16)  # an opcode no SMMU knows: CERROR_ILL
    with pytest.raises(BenchmarkError, match="command queue stopped"):
        rig.run(1)


def test_b5_broken_table_is_an_error_not_a_figure() -> None:
    table = b5_translation.NestedTable()
    table.check()
    leaf_table = b5_translation.RAM_IPA + 0x10000 + 3 * b5_translation.PAGE_SIZE
    off = leaf_table - b5_translation.RAM_IPA + table._index(table.iovas[7], 3) * 8
    table.ram[off:off + 8] = bytes(8)  # the leaf of page 7 becomes invalid
    table.sim.hwpt_invalidate(table.viommu, [table.flush])
    with pytest.raises(BenchmarkError, match="faulted"):
        table.check()


@pytest.mark.parametrize("samples", [[0.0], [-1.0], [float("inf")], []])
def test_insane_samples_are_refused(samples: list[float]) -> None:
    with pytest.raises(BenchmarkError):
        Figure("B0.x", "x", "u", samples, higher_is_better=True).check_sane()


def test_b3_without_guests_measures_the_floor_and_the_service_alone() -> None:
    import asyncio

    from benchmarks import b3_trap
    (section,) = asyncio.run(b3_trap.TrapBenchmark(QUICK, guest=False).measure())
    figures = {f.key: f for f in section.figures}
    assert set(figures) == {"B3.floor", "B3.service"}
    assert all(f.median > 0 for f in figures.values())
    (ratio,) = section.ratios
    assert ratio.key == "B3.ratio_service_floor" and ratio.value > 0
    assert {m.key for m in section.not_measured} == {"B3.ours", "B3.qemu"}


def test_b3_service_probe_checks_what_the_service_returns(tmp_path: Path) -> None:
    from benchmarks import b3_trap
    from vsmmu.arch.registers import Reg
    from vsmmu.smmu import SmmuFeatures
    idr0 = SmmuFeatures().id_registers()[Reg.IDR0]
    with b3_trap.ServiceProbe(tmp_path) as service:
        assert service.read_idr0() == idr0
        assert service.round_trips(20, idr0) > 0
        with pytest.raises(BenchmarkError, match="IDR0 read"):
            service.round_trips(20, idr0 ^ 1)
    assert service.proc is not None and service.proc.returncode is not None


async def test_b6_scaling_quick_round_gives_sane_tables() -> None:
    bench = b6_scaling.ScalingBenchmark(QUICK)
    await bench.round(0)
    (section,) = bench.sections()
    keys = {f.key for f in section.figures}
    assert {"B6.cfgi_all_16", "B6.cfgi_all_64", "B6.rss_1", "B6.rss_2", "B6.miss_1",
            "B6.miss_8"} <= keys
    ratios = {r.key: r.value for r in section.ratios}
    assert set(ratios) == {"B6.cfgi_all_growth", "B6.rss_growth", "B6.miss_growth"}
    # A service with endpoints has a real resident set (tens of MiB of Python), not zero.
    assert section.value_of("B6.rss_1") is not None and section.value_of("B6.rss_1") > 5


def test_b6_rig_attaches_every_stream() -> None:
    rig = b6_scaling.StreamsRig(16)
    assert sum(1 for s in rig.translator.streams() if s.hwpt is not None) == 16
    assert rig.sample() > 0
