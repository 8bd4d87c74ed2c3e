"""What a benchmark run produces: figures with repeats, ratios, targets, a table and JSON.

A :class:`Figure` is one measured quantity with one sample per repeat; the
table shows its minimum and median.  A :class:`Ratio` compares two figures
measured side by side in the same run (the median of their per-round
ratios).  A :class:`Target` is one of the issue's goals; it is *reported*
(met / not met / not measured), never asserted.
A benchmark that cannot run says so with a :class:`NotMeasured` entry instead
of a made-up number.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


class BenchmarkError(RuntimeError):
    """A benchmark measured something impossible (a broken path, not a slow one)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard to measure: ``repeats`` samples per figure; ``quick`` = smallest sizes."""

    cache: Path
    repeats: int = 5
    quick: bool = False


@dataclasses.dataclass
class Figure:
    """One measured quantity: ``samples`` (one per repeat) in ``unit``."""

    key: str
    label: str
    unit: str
    samples: list[float]
    higher_is_better: bool

    @property
    def minimum(self) -> float:
        """The smallest sample."""
        return min(self.samples)

    @property
    def median(self) -> float:
        """The median sample."""
        return statistics.median(self.samples)

    def check_sane(self) -> None:
        """Raise BenchmarkError unless every sample is a finite positive number."""
        if not self.samples:
            raise BenchmarkError(f"figure {self.key}: no samples, expected at least one")
        for value in self.samples:
            if not (value > 0 and value != float("inf")):
                raise BenchmarkError(
                    f"figure {self.key}: sample {value!r}, expected > 0 and finite")

    def to_json(self) -> dict[str, object]:
        """The figure as a JSON object."""
        return {"key": self.key, "label": self.label, "unit": self.unit,
                "min": self.minimum, "median": self.median, "samples": self.samples,
                "higher_is_better": self.higher_is_better}


@dataclasses.dataclass
class Ratio:
    """``numerator / denominator``, two figures measured side by side in the same run.

    When both have one sample per round (sample ``i`` of each taken in round ``i``,
    next to each other), the ratio is the median of the per-round ratios: a shift of
    the host's speed between rounds moves both samples of a pair and cancels.
    Otherwise it is the ratio of the two medians.
    """

    key: str
    label: str
    numerator: Figure
    denominator: Figure

    @property
    def paired(self) -> bool:
        """Whether the two figures have sample-for-sample partners."""
        return len(self.numerator.samples) == len(self.denominator.samples)

    @property
    def value(self) -> float:
        """The median of the paired ratios, or the ratio of the medians."""
        if self.paired:
            return statistics.median(n / d for n, d in zip(self.numerator.samples,
                                                           self.denominator.samples,
                                                           strict=True))
        return self.numerator.median / self.denominator.median

    def to_json(self) -> dict[str, object]:
        """The ratio as a JSON object."""
        return {"key": self.key, "label": self.label, "value": self.value,
                "method": "median of paired ratios" if self.paired else "ratio of medians",
                "numerator": self.numerator.key, "denominator": self.denominator.key}


@dataclasses.dataclass(frozen=True)
class NotMeasured:
    """A figure or ratio this run could not measure, and why."""

    key: str
    label: str
    reason: str

    def to_json(self) -> dict[str, object]:
        """The entry as a JSON object."""
        return {"key": self.key, "label": self.label, "not_measured": self.reason}


@dataclasses.dataclass
class Section:
    """Everything one benchmark (B1…B5) produced."""

    bench_id: str
    title: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    ratios: list[Ratio] = dataclasses.field(default_factory=list)
    not_measured: list[NotMeasured] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def figure(self, key: str, label: str, unit: str, samples: Sequence[float], *,
               higher_is_better: bool) -> Figure:
        """Add a figure (checked sane) and return it."""
        fig = Figure(key, label, unit, list(samples), higher_is_better)
        fig.check_sane()
        self.figures.append(fig)
        return fig

    def ratio(self, key: str, label: str, numerator: Figure, denominator: Figure) -> Ratio:
        """Add a ratio of two figures' medians and return it."""
        ratio = Ratio(key, label, numerator, denominator)
        self.ratios.append(ratio)
        return ratio

    def missing(self, key: str, label: str, reason: str) -> None:
        """Record that ``key`` was not measured, with the reason."""
        self.not_measured.append(NotMeasured(key, label, reason))

    def value_of(self, key: str) -> float | None:
        """The median of figure ``key`` or the value of ratio ``key``; None if absent."""
        for fig in self.figures:
            if fig.key == key:
                return fig.median
        for ratio in self.ratios:
            if ratio.key == key:
                return ratio.value
        return None

    def to_json(self) -> dict[str, object]:
        """The section as a JSON object."""
        return {"id": self.bench_id, "title": self.title,
                "figures": [f.to_json() for f in self.figures],
                "ratios": [r.to_json() for r in self.ratios],
                "not_measured": [n.to_json() for n in self.not_measured],
                "notes": self.notes}


class Compare(enum.Enum):
    """How a target bounds its subject."""

    AT_MOST = "<="
    AT_LEAST = ">="


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the issue's goals: the figure or ratio ``subject`` compared with ``bound``."""

    bench_id: str
    subject: str
    compare: Compare
    bound: float
    text: str

    def status(self, sections: Sequence[Section]) -> tuple[str, float | None]:
        """("met" | "not met" | "not measured", the subject's value)."""
        for section in sections:
            value = section.value_of(self.subject)
            if value is not None:
                ok = value <= self.bound if self.compare is Compare.AT_MOST else value >= self.bound
                return ("met" if ok else "not met"), value
        return "not measured", None


TARGETS: tuple[Target, ...] = (
    Target("B1", "B1.ratio", Compare.AT_MOST, 1.1, "boot to first DMA <= 1.1x QEMU"),
    Target("B2", "B2.read_ratio", Compare.AT_LEAST, 0.8, "disk read MB/s >= 0.8x QEMU"),
    Target("B2", "B2.write_ratio", Compare.AT_LEAST, 0.8, "disk write MB/s >= 0.8x QEMU"),
    Target("B2-hwrng", "B2-hwrng.ratio", Compare.AT_LEAST, 0.7, "hwrng MB/s >= 0.7x QEMU"),
    Target("B3", "B3.ratio_floor", Compare.AT_MOST, 1.5, "trap round trip <= 1.5x socket floor"),
    Target("B4", "B4.tlbi_nh_va_ratio", Compare.AT_LEAST, 0.8,
           "TLBI_NH_VA full path >= 0.8x model alone"),
    Target("B4", "B4.cfgi_ste_ratio", Compare.AT_LEAST, 0.8,
           "CFGI_STE full path >= 0.8x model alone"),
    Target("B5", "B5.hit_4096_ratio", Compare.AT_LEAST, 0.7,
           "4 KiB IOTLB hits >= 0.7x a memoryview copy"),
    Target("B5", "B5.miss_4096_ratio", Compare.AT_LEAST, 0.05,
           "4 KiB IOTLB misses >= 0.05x a memoryview copy"),
)
"""The issue's targets, reported against each run."""


def _fmt(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


def environment(cache: Path) -> dict[str, object]:
    """Versions of QEMU, the guest kernel and Python, and the core count."""
    from guest_images.kernel import load_guest
    from qmp_harness.provision import load_install

    install = load_install(cache)
    guest = None
    try:
        guest = load_guest(cache)
    except Exception as exc:  # a half-provisioned cache is reported, not fatal
        logger.warning("guest kernel manifest unreadable: %s", exc)
    return {
        "qemu": install.version if install is not None else "not provisioned",
        "guest_kernel": guest.release if guest is not None else "not provisioned",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "host_kernel": platform.release(),
        "cores": os.cpu_count() or 0,
    }


def render_table(sections: Sequence[Section], env: dict[str, object],
                 settings: Settings) -> str:
    """The one table ``python -m benchmarks`` prints (Markdown, so the README can show it)."""
    lines = [
        f"QEMU {env['qemu']}, guest kernel {env['guest_kernel']}, "
        f"Python {env['python']}, {env['cores']} cores, {settings.repeats} repeat(s)"
        + (", quick sizes" if settings.quick else ""),
        "",
        "| bench | figure | unit | min | median |",
        "|---|---|---|---|---|",
    ]
    for section in sections:
        for fig in section.figures:
            lines.append(f"| {section.bench_id} | {fig.label} | {fig.unit} | "
                         f"{_fmt(fig.minimum)} | {_fmt(fig.median)} |")
        for ratio in section.ratios:
            lines.append(f"| {section.bench_id} | {ratio.label} | ratio | | "
                         f"{ratio.value:.3g} |")
        for miss in section.not_measured:
            lines.append(f"| {section.bench_id} | {miss.label} | | not measured: "
                         f"{miss.reason} | |")
    lines += ["", "| target | where we are | status |", "|---|---|---|"]
    for target in TARGETS:
        status, value = target.status(sections)
        shown = _fmt(value) if value is not None else "-"
        lines.append(f"| {target.bench_id}: {target.text} | {shown} | {status} |")
    notes = [f"* {s.bench_id}: {n}" for s in sections for n in s.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_json(path: Path, sections: Sequence[Section], env: dict[str, object],
               settings: Settings) -> None:
    """Write the run as JSON (environment, settings, every figure/ratio, target status)."""
    targets = []
    for target in TARGETS:
        status, value = target.status(sections)
        targets.append({"bench": target.bench_id, "subject": target.subject,
                        "compare": target.compare.value, "bound": target.bound,
                        "text": target.text, "value": value, "status": status})
    doc = {"environment": env,
           "settings": {"repeats": settings.repeats, "quick": settings.quick},
           "benchmarks": [s.to_json() for s in sections],
           "targets": targets}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


WARMUP_S = 0.3
"""Seconds of discarded samples before each in-process round (the samples right after
a guest's teardown, or after an idle host, ran slow)."""


def _sample_quietly(sample: Callable[[], float]) -> float:
    gc.collect()
    gc.disable()
    try:
        return sample()
    finally:
        gc.enable()


def round_order(round_index: int, count: int) -> list[int]:
    """The order in which round ``round_index`` samples ``count`` interleaved figures.

    Rotated by one each round, so no figure always runs first (right after the
    previous round's last one) or last.
    """
    return [(round_index + step) % count for step in range(count)]


def sample_round(settings: Settings, round_index: int,
                 samplers: Sequence[Callable[[], float]], *,
                 warmup_s: float | None = None) -> list[float]:
    """One sample of every sampler, in :func:`round_order`; the samples in sampler order.

    Figures that are compared (ours and its baseline) are sampled in turn, so a burst
    of host noise or a drift of the host's speed lands on both sides instead of on
    whichever ran at that moment.  The samplers first run for ``warmup_s`` seconds
    (default :data:`WARMUP_S`, none for a quick run), discarded.  Each sample starts
    from a collected heap and runs with the cyclic GC paused, so a collection
    triggered by earlier garbage does not land inside a timed loop.
    """
    if warmup_s is None:
        warmup_s = 0.0 if settings.quick else WARMUP_S
    deadline = time.monotonic() + warmup_s
    while time.monotonic() < deadline:
        for sample in samplers:
            _sample_quietly(sample)
    out = [0.0] * len(samplers)
    for index in round_order(round_index, len(samplers)):
        out[index] = _sample_quietly(samplers[index])
    return out


class RoundBenchmark(abc.ABC):
    """A benchmark measured round by round: each round takes one sample of each figure.

    ``python -m benchmarks`` runs round 0 of every benchmark, then round 1 of every
    benchmark, and so on, so each figure's samples are spread over the whole run
    rather than bunched in a few seconds of it: this host's speed changes by a fifth
    or more from one stretch of seconds to the next, and a figure measured in one
    stretch moved with it from run to run.
    """

    ids: tuple[str, ...] = ()
    """The benchmark ids whose sections this produces."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def round(self, index: int) -> None:
        """Take sample ``index`` of every figure; BenchmarkError when a path breaks."""

    @abc.abstractmethod
    def sections(self) -> list[Section]:
        """The sections with every sample taken so far."""

    async def measure(self) -> list[Section]:
        """All ``settings.repeats`` rounds on their own; the sections."""
        for index in range(self.settings.repeats):
            await self.round(index)
        return self.sections()
