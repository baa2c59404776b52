"""The trace sample every configuration is simulated on, replayed at any request rate.

Splitwise provisions on a short sample of a production trace. The sample's prompt and output lengths are always
the trace's; its arrival times come in one of two shapes, both defined at a mean rate of 1 request/s and divided
by the rate asked for:
  trace    the trace's own timestamps, stretched or compressed (its bursts are compressed with it): the gaps at
           `rps` are the trace's gaps x natural_rps / rps, where natural_rps = (n - 1) / span.
  poisson  a Poisson process (seeded, so every configuration sees the same arrivals): the trace's lengths with
           the burstiness of independent arrivals.
Dividing one fixed set of unit-rate offsets by the rate makes a higher rate the same arrivals, only closer
together, which keeps "meets the SLOs" close to monotone in the rate for the bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ops.bench.workload import TraceRequest, load_azure_trace, poisson_arrivals

ArrivalShape = Literal["trace", "poisson"]
ARRIVAL_SHAPES: tuple[ArrivalShape, ...] = ("trace", "poisson")


@dataclass(frozen=True, slots=True)
class TraceSample:
    path: Path
    start: int  # first trace row of the sample (0-based, header not counted)
    requests: tuple[TraceRequest, ...]  # arrival offsets from the sample's first request
    arrivals: ArrivalShape = "trace"
    seed: int = 0  # of the Poisson arrivals
    _unit_offsets: np.ndarray = field(init=False, repr=False, compare=False)  # arrivals at 1 request/s

    def __post_init__(self) -> None:
        if len(self.requests) < 2:
            raise ValueError(
                f"{self.path}: the sample needs at least 2 requests (got {len(self.requests)} from row "
                f"{self.start}); check --start and --limit"
            )
        if self.arrivals not in ARRIVAL_SHAPES:
            raise ValueError(f"unknown arrival shape {self.arrivals!r}; known: {', '.join(ARRIVAL_SHAPES)}")
        if self.arrivals == "poisson":
            offsets = np.asarray(poisson_arrivals(1.0, len(self.requests), self.seed))
            offsets *= (len(offsets) - 1) / offsets[
                -1
            ]  # exactly 1 request/s over the sample, as in trace mode
        elif self.span_s > 0:
            first = self.requests[0].arrival_s
            offsets = np.array([r.arrival_s - first for r in self.requests]) * self.natural_rps
        else:
            raise ValueError(
                f"{self.path}: every request of the sample arrives at the same time; no rate to scale"
            )
        object.__setattr__(self, "_unit_offsets", offsets)

    @classmethod
    def load(
        cls, path: Path, *, start: int, limit: int, arrivals: ArrivalShape = "trace", seed: int = 0
    ) -> TraceSample:
        """Rows start .. start+limit-1 of an Azure trace; ValueError (one line) for a missing or malformed file."""
        if limit < 2:
            raise ValueError(f"--limit must be >= 2 requests, got {limit}")
        try:
            requests = load_azure_trace(path, start=start, limit=limit)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the trace: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text CSV file") from None
        return cls(Path(path), start, tuple(requests), arrivals, seed)

    @property
    def span_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def natural_rps(self) -> float:
        """The trace's own mean rate over the sample (inf when all its requests share one timestamp)."""
        return (len(self.requests) - 1) / self.span_s if self.span_s > 0 else math.inf

    def mean_prompt_tokens(self) -> float:
        return float(np.mean([r.prompt_tokens for r in self.requests]))

    def mean_output_tokens(self) -> float:
        return float(np.mean([r.output_tokens for r in self.requests]))

    def at_rate(self, rps: float) -> list[TraceRequest]:
        if not (math.isfinite(rps) and rps > 0):
            raise ValueError(f"a request rate must be a finite number > 0, got {rps}")
        offsets = (self._unit_offsets / rps).tolist()
        return [
            TraceRequest(offset, r.prompt_tokens, r.output_tokens)
            for offset, r in zip(offsets, self.requests, strict=True)
        ]

    def describe(self) -> str:
        shape = "trace arrivals" if self.arrivals == "trace" else f"Poisson arrivals (seed {self.seed})"
        return (
            f"{len(self.requests)} requests from row {self.start} of {self.path.name} "
            f"({self.span_s:.0f} s at {self.natural_rps:.2f} req/s), {shape}"
        )
