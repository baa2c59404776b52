"""Per-request latency metrics, their aggregates, goodput and the Splitwise 9-SLO check.

Definitions (times in seconds, from one monotonic client clock; records are in workload order, position i being
request i):
  TTFT    first_token - start.
  E2E     end - start.
  TBT     (a.k.a. ITL) the gaps between consecutive token *arrivals*. `token_times` holds one entry per output token;
          a streamed chunk that carries k tokens shows up as k equal timestamps and counts as ONE arrival: it adds
          one gap (the wait since the previous arrival, what the user saw), not k gaps and no zero gaps. A request
          whose tokens arrive one per chunk has output_tokens - 1 gaps. This matches vLLM's `bench serve` ITL, so
          numbers compare across tools; TPOT is the per-token pace.
  TPOT    (E2E - TTFT) / (output_tokens - 1), defined for output_tokens > 1.
Failed requests (`error` set) are left out of every latency statistic and of the throughputs, and counted by kind:
the kind of an error is its text up to the first ':' ("timeout", "http_503: Service Unavailable" -> "http_503").
A request with no error but no first token is counted as failed with kind "no_tokens".

Percentiles use linear interpolation between the closest ranks, numpy's default `method="linear"` (Hyndman & Fan
type 7): for sorted v[0..n-1], rank r = q/100 * (n-1), value = v[floor r] + (r - floor r) * (v[ceil r] - v[floor r]).

Throughputs divide by the run's duration: the caller's wall-clock duration if given, else last end - first start.
Goodput (DistServe style): requests per second that completed with TTFT <= ttft and TPOT <= tpot (and E2E <= e2e,
if given; a single-token output has no TPOT and passes that limit); attainment = good requests / all requests.
The Splitwise 9-SLO check (slowdowns against a baseline run) is defined in `ops.bench.slo`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ops.bench.samples import RequestSample
from ops.bench.slo import Goodput, GoodputSlos, SloCheck, compute_goodput, splitwise_slo_check
from ops.bench.stats import Stats

__all__ = [
    "NO_TOKENS",
    "Goodput",
    "GoodputSlos",
    "RequestSample",
    "RequestTiming",
    "SloCheck",
    "Stats",
    "Summary",
    "error_kind",
    "json_safe",
    "request_sample",
    "request_samples",
    "summarize",
    "tbt_gaps",
]

NO_TOKENS = "no_tokens"


@dataclass(slots=True)
class RequestTiming:
    """What the load generator records for one request (monotonic clock, seconds)."""

    start: float  # when the request was sent
    first_token: float | None  # arrival of the first output token; None if none came
    token_times: list[
        float
    ]  # arrival of each output token, first included; a k-token chunk repeats its time k times
    end: float  # when the response was complete (or failed)
    prompt_tokens: int
    output_tokens: int  # tokens received (the server's usage count when it gives one)
    error: str | None = None  # "kind: detail" for a failed request, None for a successful one
    server_ttft: float | None = (
        None  # TTFT the server measured, where it reports one (splitserve's gRPC does)
    )
    # Prompt tokens the server served from its prefix cache, where it reports them (usage cached tokens).
    cached_prompt_tokens: int | None = None
    # The answer itself, which a multi-turn conversation sends back as context (ops/bench/conversations.py).
    output_token_ids: list[int] = field(default_factory=list)  # gRPC only
    output_text: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    completed: int
    failed: int
    errors_by_kind: dict[str, int]
    duration_s: float
    request_throughput: float  # completed requests per second
    input_throughput: float  # prompt tokens of completed requests per second
    output_throughput: float  # output tokens of completed requests per second
    total_prompt_tokens: int  # of completed requests
    total_output_tokens: int
    ttft_s: Stats
    tpot_s: Stats
    tbt_s: Stats  # pooled over every gap of every completed request
    e2e_s: Stats
    server_ttft_s: Stats
    goodput: Goodput | None = None
    slo_check: SloCheck | None = None
    percentile_method: str = field(default="linear")
    # Of total_prompt_tokens, those the server reported as served from its prefix cache (None: it reported none).
    cached_prompt_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Inverse of `to_dict`; raises ValueError on a dict of another shape."""
        try:
            return cls(
                requests=int(data["requests"]),
                completed=int(data["completed"]),
                failed=int(data["failed"]),
                errors_by_kind={str(k): int(v) for k, v in data["errors_by_kind"].items()},
                duration_s=float(data["duration_s"]),
                request_throughput=float(data["request_throughput"]),
                input_throughput=float(data["input_throughput"]),
                output_throughput=float(data["output_throughput"]),
                total_prompt_tokens=int(data["total_prompt_tokens"]),
                total_output_tokens=int(data["total_output_tokens"]),
                ttft_s=Stats(**data["ttft_s"]),
                tpot_s=Stats(**data["tpot_s"]),
                tbt_s=Stats(**data["tbt_s"]),
                e2e_s=Stats(**data["e2e_s"]),
                server_ttft_s=Stats(**data["server_ttft_s"]),
                goodput=Goodput.from_dict(data["goodput"]) if data.get("goodput") else None,
                slo_check=SloCheck.from_dict(data["slo_check"]) if data.get("slo_check") else None,
                percentile_method=str(data.get("percentile_method", "linear")),
                cached_prompt_tokens=(
                    None if data.get("cached_prompt_tokens") is None else int(data["cached_prompt_tokens"])
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a bench summary: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Summary:
        return cls.from_dict(json.loads(text))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float written as the string "inf", "-inf" or "nan" (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def error_kind(error: str) -> str:
    kind = error.split(":", 1)[0].strip()
    return kind or "error"


def tbt_gaps(token_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive distinct arrival times (see the module docstring for chunks)."""
    gaps: list[float] = []
    for previous, current in itertools.pairwise(token_times):
        if current > previous:
            gaps.append(current - previous)
    return gaps


def request_sample(timing: RequestTiming, index: int, run_start: float) -> RequestSample:
    error = timing.error
    if error is None and timing.first_token is None:
        error = NO_TOKENS
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    tbt_max: float | None = None
    if error is None and timing.first_token is not None:
        ttft = timing.first_token - timing.start
        e2e = timing.end - timing.start
        tpot = (e2e - ttft) / (timing.output_tokens - 1) if timing.output_tokens > 1 else None
        tbt_max = max(tbt_gaps(timing.token_times), default=None)
    return RequestSample(
        index=index,
        start_s=timing.start - run_start,
        end_s=timing.end - run_start,
        prompt_tokens=timing.prompt_tokens,
        output_tokens=timing.output_tokens,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        tbt_max_s=tbt_max,
        arrivals=len(set(timing.token_times)),
        server_ttft_s=timing.server_ttft if error is None else None,
        error=error,
    )


def request_samples(timings: Sequence[RequestTiming]) -> list[RequestSample]:
    run_start = min((t.start for t in timings), default=0.0)
    return [request_sample(t, i, run_start) for i, t in enumerate(timings)]


def summarize(
    timings: Sequence[RequestTiming],
    *,
    duration_s: float | None = None,
    slos: GoodputSlos | None = None,
    baseline: Sequence[RequestSample] | None = None,
) -> Summary:
    """Aggregate a run. `baseline`, the samples of an earlier unloaded run, adds the Splitwise 9-SLO check."""
    samples = request_samples(timings)
    if duration_s is None:
        duration_s = max((s.end_s for s in samples), default=0.0)
    if not (duration_s >= 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a finite number >= 0, not {duration_s}")
    done = [s for s in samples if s.ok]
    done_timings = [t for t, s in zip(timings, samples, strict=True) if s.ok]
    prompt_tokens = sum(s.prompt_tokens for s in done)
    output_tokens = sum(s.output_tokens for s in done)
    return Summary(
        requests=len(samples),
        completed=len(done),
        failed=len(samples) - len(done),
        errors_by_kind=dict(sorted(Counter(error_kind(s.error) for s in samples if s.error).items())),
        duration_s=duration_s,
        request_throughput=_per_second(len(done), duration_s),
        input_throughput=_per_second(prompt_tokens, duration_s),
        output_throughput=_per_second(output_tokens, duration_s),
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        ttft_s=Stats.of(_present(s.ttft_s for s in done)),
        tpot_s=Stats.of(_present(s.tpot_s for s in done)),
        tbt_s=Stats.of([gap for t in done_timings for gap in tbt_gaps(t.token_times)]),
        e2e_s=Stats.of(_present(s.e2e_s for s in done)),
        server_ttft_s=Stats.of(_present(s.server_ttft_s for s in done)),
        goodput=compute_goodput(samples, slos, duration_s) if slos is not None else None,
        slo_check=splitwise_slo_check(samples, baseline) if baseline is not None else None,
        cached_prompt_tokens=_sum_reported(t.cached_prompt_tokens for t in done_timings),
    )


def _sum_reported(values: Iterable[int | None]) -> int | None:
    reported = [v for v in values if v is not None]
    return sum(reported) if reported else None


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0
