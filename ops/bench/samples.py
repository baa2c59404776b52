"""One request's derived metrics (ops/bench/metrics.py computes them), in a module of its own so that the SLO
checks (ops/bench/slo.py) and the metrics that use those checks both build on it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestSample:
    """One request's derived metrics; what the per-request CSV holds, and what a baseline run is read back as."""

    index: int  # position in the workload
    start_s: float  # offset from the run's first start
    end_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # None for a failed request (as are all the metrics below)
    tpot_s: float | None  # also None for output_tokens <= 1
    e2e_s: float | None
    tbt_max_s: float | None  # the longest gap between token arrivals; None with fewer than two arrivals
    arrivals: int  # distinct token arrival times (streamed chunks)
    server_ttft_s: float | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None
