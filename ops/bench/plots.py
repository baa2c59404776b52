"""Plots of a run: latency CDFs, and throughput and latency over time.

The data preparation (`cdf_points`, `timeline`) is plain Python and always available; `plot_run` renders PNGs
with matplotlib, which the harness does not depend on: without it, `plot_run` raises `PlotUnavailable`.
Time series are binned by when requests *finished* for throughput and errors, and by when they were *sent* for
latency (what a request sent at time t experienced).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.bench.samples import RequestSample
from ops.bench.stats import percentile

__all__ = ["PlotUnavailable", "Timeline", "cdf_points", "plot_run", "timeline"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True, slots=True)
class Timeline:
    bin_s: float
    bin_starts_s: list[float]  # offset of each bin from the run's first send
    completed_rps: list[float]  # successful completions per second, by finish time
    output_tps: list[
        float
    ]  # output tokens of those completions per second (all attributed to the finish bin)
    errors: list[int]  # failures, by finish time
    ttft_p50_s: list[float | None]  # median TTFT of requests sent in the bin; None where none were
    tpot_p50_s: list[float | None]
    e2e_p50_s: list[float | None]


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Empirical CDF: sorted values and the fraction of values <= each, (i+1)/n."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def timeline(samples: Sequence[RequestSample], bin_s: float = 1.0) -> Timeline:
    if not (bin_s > 0 and math.isfinite(bin_s)):
        raise ValueError(f"bin_s must be a finite number > 0, not {bin_s}")
    span = max((max(s.end_s, s.start_s) for s in samples), default=0.0)
    bins = max(1, math.floor(span / bin_s) + 1)
    completed = [0] * bins
    tokens = [0] * bins
    errors = [0] * bins
    sent: list[list[RequestSample]] = [[] for _ in range(bins)]
    for s in samples:
        finished = min(bins - 1, math.floor(s.end_s / bin_s))
        if s.ok:
            completed[finished] += 1
            tokens[finished] += s.output_tokens
            sent[min(bins - 1, math.floor(s.start_s / bin_s))].append(s)
        else:
            errors[finished] += 1
    return Timeline(
        bin_s=bin_s,
        bin_starts_s=[k * bin_s for k in range(bins)],
        completed_rps=[c / bin_s for c in completed],
        output_tps=[t / bin_s for t in tokens],
        errors=errors,
        ttft_p50_s=[_median([s.ttft_s for s in group]) for group in sent],
        tpot_p50_s=[_median([s.tpot_s for s in group]) for group in sent],
        e2e_p50_s=[_median([s.e2e_s for s in group]) for group in sent],
    )


def plot_run(
    samples: Sequence[RequestSample], out_dir: str | Path, *, title: str = "", bin_s: float | None = None
) -> list[Path]:
    """Write latency_cdf.png and timeline.png into `out_dir`; returns their paths.

    bin_s defaults to a thirtieth of the run (at least 10 ms), so short and long runs both get a readable timeline.
    """
    if bin_s is None:
        span = max((s.end_s for s in samples), default=0.0)
        bin_s = max(span / 30, 0.01)
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [s for s in samples if s.ok]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (label, values) in zip(
        axes,
        (
            ("TTFT", [s.ttft_s for s in ok]),
            ("TPOT", [s.tpot_s for s in ok]),
            ("E2E", [s.e2e_s for s in ok]),
        ),
        strict=True,
    ):
        xs, ys = cdf_points([v * 1e3 for v in values if v is not None])
        ax.plot(xs, ys)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    figure.suptitle(title or "latency CDF")
    figure.tight_layout()
    paths = [out / "latency_cdf.png"]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)
    paths.append(_plot_timeline(plt, timeline(samples, bin_s), out / "timeline.png", title))
    return paths


def _plot_timeline(plt: Any, series: Timeline, path: Path, title: str) -> Path:
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    # Markers too: a run shorter than two bins still shows its point.
    top.plot(series.bin_starts_s, series.completed_rps, marker=".", label="completed req/s")
    top.plot(series.bin_starts_s, series.errors, marker=".", label="errors per bin")
    twin = top.twinx()
    twin.plot(series.bin_starts_s, series.output_tps, marker=".", color="tab:green", label="output tok/s")
    top.legend(loc="upper left")
    twin.legend(loc="upper right")
    for label, values in (
        ("TTFT p50", series.ttft_p50_s),
        ("TPOT p50", series.tpot_p50_s),
        ("E2E p50", series.e2e_p50_s),
    ):
        ms = [math.nan if v is None else v * 1e3 for v in values]
        bottom.plot(series.bin_starts_s, ms, marker=".", label=label)
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (by send time)")
    bottom.set_xlabel("seconds since the first request")
    bottom.legend()
    figure.suptitle(title or "throughput and latency over time")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise PlotUnavailable("install matplotlib for --plot (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only; never open a window
    return importlib.import_module("matplotlib.pyplot")


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return percentile(present, 50) if present else None
