"""Service-level objectives: DistServe-style goodput and the Splitwise paper's 9-SLO check.

Splitwise (Patel et al., ISCA 2024, Table VI; docs: shared/design/splitwise-facts.md, "SLOs") states its SLOs as
slowdowns: a request's latency under load divided by the same request's latency when it runs alone (on a DGX-A100
in the paper; here, in a baseline run the user chose, typically the same workload at concurrency 1). The P50, P90
and P99 over requests of the TTFT, TBT and E2E slowdowns must all stay within these limits:

            P50    P90    P99
    TTFT    2x     3x     6x
    TBT     1.25x  1.5x   5x
    E2E     1.25x  1.5x   5x

A request's TBT here is its mean time between tokens, TPOT, so that every request has one TBT to compare with its
baseline. Slowdowns are matched per request when the baseline ran the same requests: the same count and, at every
index where both succeeded, the same prompt and output lengths (fix output lengths, e.g. ignore EOS, for E2E to be
comparable). Otherwise the check falls back to percentiles: slowdown at Pq = Pq(run) / Pq(baseline), an
approximation that holds when both runs draw from the same length distribution. A request that failed in the run
counts as an infinite slowdown (it missed every SLO); one that failed in the baseline, or has no TBT (a single
output token) in either run, is left out of that metric. A limit holds when slowdown <= limit; a metric with no
samples at all holds vacuously, but the whole check passes only if at least one request was compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cluster.slo import SPLITWISE_SLO_LIMITS, SloMetric
from ops.bench.samples import RequestSample
from ops.bench.stats import percentile

__all__ = [
    "Goodput",
    "GoodputSlos",
    "SloCheck",
    "SloRow",
    "compute_goodput",
    "splitwise_slo_check",
]

_METRIC_OF: dict[SloMetric, Callable[[RequestSample], float | None]] = {
    "ttft": lambda s: s.ttft_s,
    "tbt": lambda s: s.tpot_s,
    "e2e": lambda s: s.e2e_s,
}


@dataclass(frozen=True, slots=True)
class GoodputSlos:
    """Per-request limits in seconds (vLLM's `--goodput ttft:300 tpot:50` in ms is ttft_s=0.3, tpot_s=0.05)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        limits = (self.ttft_s, self.tpot_s, self.e2e_s)
        if all(limit is None for limit in limits):
            raise ValueError("goodput needs at least one of the ttft, tpot and e2e limits")
        for limit in limits:
            if limit is not None and not (limit > 0 and math.isfinite(limit)):
                raise ValueError(f"an SLO limit must be a finite number of seconds > 0, not {limit}")

    def met_by(self, sample: RequestSample) -> bool:
        if not sample.ok:
            return False
        return (
            _within(sample.ttft_s, self.ttft_s)
            and _within(sample.tpot_s, self.tpot_s)
            and _within(sample.e2e_s, self.e2e_s)
        )


@dataclass(frozen=True, slots=True)
class Goodput:
    slos: GoodputSlos
    good_requests: int  # completed within every limit
    goodput_rps: float  # good_requests / duration
    attainment: float  # good_requests / all requests, failed ones included; DistServe asks for >= 0.9

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Goodput:
        return cls(**{**data, "slos": GoodputSlos(**data["slos"])})


@dataclass(frozen=True, slots=True)
class SloRow:
    metric: SloMetric
    percentile: int
    slowdown: (
        float | None
    )  # None when no request had this metric; +inf when failed requests reach the percentile
    limit: float
    ok: bool


@dataclass(frozen=True, slots=True)
class SloCheck:
    mode: Literal["per_request", "percentile"]
    compared: int  # requests in the comparison (per request: with a successful baseline)
    rows: tuple[SloRow, ...]  # the nine, in SPLITWISE_SLO_LIMITS order
    passed: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SloCheck:
        rows = tuple(
            SloRow(**{**row, "slowdown": None if row["slowdown"] is None else float(row["slowdown"])})
            for row in data["rows"]
        )
        return cls(mode=data["mode"], compared=data["compared"], rows=rows, passed=data["passed"])


def compute_goodput(samples: Sequence[RequestSample], slos: GoodputSlos, duration_s: float) -> Goodput:
    good = sum(1 for s in samples if slos.met_by(s))
    return Goodput(
        slos=slos,
        good_requests=good,
        goodput_rps=good / duration_s if duration_s > 0 else 0.0,
        attainment=good / len(samples) if samples else 0.0,
    )


def splitwise_slo_check(run: Sequence[RequestSample], baseline: Sequence[RequestSample]) -> SloCheck:
    """P50/P90/P99 of the TTFT, TBT and E2E slowdowns of `run` against `baseline`, vs Splitwise's limits."""
    if _same_requests(run, baseline):
        mode: Literal["per_request", "percentile"] = "per_request"
        compared = sum(1 for b in baseline if b.ok)
        slowdowns = {metric: _paired_slowdowns(run, baseline, metric) for metric in _METRIC_OF}
        values = {key: _percentile_or_none(slowdowns[key[0]], key[1]) for key in SPLITWISE_SLO_LIMITS}
    else:
        mode, compared = "percentile", len(run)
        values = {key: _percentile_ratio(run, baseline, *key) for key in SPLITWISE_SLO_LIMITS}
    rows = tuple(
        SloRow(metric=m, percentile=q, slowdown=values[m, q], limit=limit, ok=_within(values[m, q], limit))
        for (m, q), limit in SPLITWISE_SLO_LIMITS.items()
    )
    return SloCheck(mode=mode, compared=compared, rows=rows, passed=compared > 0 and all(r.ok for r in rows))


def _same_requests(run: Sequence[RequestSample], baseline: Sequence[RequestSample]) -> bool:
    if len(run) != len(baseline):
        return False
    for r, b in zip(run, baseline, strict=True):
        if r.prompt_tokens != b.prompt_tokens:
            return False
        if r.ok and b.ok and r.output_tokens != b.output_tokens:
            return False
    return True


def _paired_slowdowns(
    run: Sequence[RequestSample], baseline: Sequence[RequestSample], metric: SloMetric
) -> list[float]:
    value_of = _METRIC_OF[metric]
    slowdowns: list[float] = []
    for r, b in zip(run, baseline, strict=True):
        reference = value_of(b) if b.ok else None
        if reference is None or reference <= 0:
            continue
        if not r.ok:
            slowdowns.append(math.inf)
            continue
        value = value_of(r)
        if value is not None:
            slowdowns.append(value / reference)
    return slowdowns


def _percentile_ratio(
    run: Sequence[RequestSample], baseline: Sequence[RequestSample], metric: SloMetric, q: int
) -> float | None:
    value_of = _METRIC_OF[metric]
    loaded = [math.inf if not s.ok else value_of(s) for s in run]
    alone = [value_of(s) for s in baseline if s.ok]
    reference = _percentile_or_none([v for v in alone if v is not None], q)
    value = _percentile_or_none([v for v in loaded if v is not None], q)
    if reference is None or value is None or reference <= 0:
        return None
    return value / reference


def _percentile_or_none(values: Sequence[float], q: int) -> float | None:
    return percentile(values, q) if values else None


def _within(value: float | None, limit: float | None) -> bool:
    return limit is None or value is None or value <= limit
