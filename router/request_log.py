"""What the ops dashboard shows of requests: recent requests with their time split by phase, and per-second series.

The router measures each request as it relays it, so this needs no tracing backend:
- `router`: from arrival to the prefill node starting the prompt (placement, the decode node's reservation, RPC).
- `queue`: the prompt waited in the prefill node's engine queue (the node reports it).
- `prefill`: the prompt's compute on the prefill node.
- `transfer`: the wait after the prompt was computed until every KV write had landed on the decode node (a layer-wise
  transfer mostly overlaps the compute; `transfer_seconds` is the whole transfer, overlapped or not).
- `decode`: from the first token to the last one leaving the router.
A request served by one node (colocated, borrowed) has `prefill` = arrival at the node to its first token (queue
included) and `decode` after it.

Memory is bounded: the last RECENT_REQUESTS requests, the last RECENT_ERRORS failures, and SERIES_SECONDS one-second
buckets of finished requests' TTFT, TBT and transfer figures.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

RECENT_REQUESTS = 200
RECENT_ERRORS = 50
SERIES_SECONDS = 300
PHASES = ("router", "queue", "prefill", "transfer", "decode")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    prompt_tokens: int
    arrived_unix: float  # wall clock, for display
    arrived: float  # monotonic, for durations
    route: str = ""  # "pair" or "colocated" (the last placement)
    nodes: dict[str, str] = field(
        default_factory=dict
    )  # prefill/decode/colocated -> node id (the last placement)
    attempts: int = 0
    retries: list[str] = field(default_factory=list)  # why each earlier attempt was abandoned
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    transfer_seconds: float = 0.0
    transfer_bytes: int = 0
    imported_bytes: int = 0  # prefix KV its decode node wrote back into the prefill node (not computed there)
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    energy_joules: float = 0.0
    cost_usd: float = 0.0
    outcome: str = (
        "running"  # running, ok, cancelled (the client went away), or the gRPC status of the failure
    )
    error: str = ""
    _first_token_at: float | None = None

    @property
    def tbt_s(self) -> float | None:
        """Mean time between tokens after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def placed(self, route: str, nodes: dict[str, str]) -> None:
        self.attempts += 1
        self.route = route
        self.nodes = dict(nodes)

    def prefilled(self, rpc_started: float, queue_s: float, compute_s: float, transfer_wait_s: float) -> None:
        """A prefill node answered: its RPC started at `rpc_started` (monotonic); the node's own split of its time."""
        self.phases["router"] = max(0.0, rpc_started - self.arrived)
        self.phases["queue"] = queue_s
        self.phases["prefill"] = max(0.0, compute_s - queue_s)
        self.phases["transfer"] = transfer_wait_s

    def first_token(self, now: float) -> None:
        if self._first_token_at is not None:
            return
        self._first_token_at = now
        self.ttft_s = now - self.arrived
        if self.route == "colocated":  # one node: everything before its first token is its prefill
            self.phases["prefill"] = self.ttft_s

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["_first_token_at"], out["arrived"]
        out["tbt_s"] = self.tbt_s
        return out


@dataclass(slots=True)
class _Second:
    """Requests that finished within one wall-clock second."""

    at: int
    finished: int = 0
    failed: int = 0
    ttft: list[float] = field(default_factory=list)
    tbt: list[float] = field(default_factory=list)
    transfer_bytes: int = 0
    output_tokens: int = 0


class RequestLog:
    """The router's recent requests; written by the request handlers, read by the dashboard (one event loop)."""

    def __init__(self, clock=time.time, monotonic=time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._recent: deque[RequestRecord] = deque(maxlen=RECENT_REQUESTS)
        self._by_id: dict[str, RequestRecord] = {}
        self._errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self._seconds: deque[_Second] = deque(maxlen=SERIES_SECONDS)
        self.running = 0
        self.finished = 0  # requests served to their end since the router started
        self.failed = 0  # requests that ended with an error status (client cancels are neither)

    def start(self, request_id: str, prompt_tokens: int) -> RequestRecord:
        record = RequestRecord(request_id, prompt_tokens, self._clock(), self._monotonic())
        if len(self._recent) == self._recent.maxlen:
            self._by_id.pop(self._recent[0].request_id, None)
        self._recent.append(record)
        self._by_id[request_id] = record
        self.running += 1
        return record

    def finish(self, record: RequestRecord, outcome: str, error: str = "") -> None:
        """The request ended: "ok", "cancelled", or a gRPC status name with the message the client got."""
        if record.outcome != "running":
            return
        self.running -= 1
        now = self._monotonic()
        record.outcome, record.error = outcome, error
        record.e2e_s = now - record.arrived
        if record._first_token_at is not None:
            record.phases["decode"] = now - record._first_token_at
        second = self._second()
        if outcome == "ok":
            self.finished += 1
            second.finished += 1
            second.output_tokens += record.output_tokens
            second.transfer_bytes += record.transfer_bytes
            if record.ttft_s is not None:
                second.ttft.append(record.ttft_s)
            if record.tbt_s is not None:
                second.tbt.append(record.tbt_s)
        elif outcome != "cancelled":
            self.failed += 1
            second.failed += 1
            self._errors.append(
                {"at": self._clock(), "request_id": record.request_id, "code": outcome, "message": error}
            )

    def get(self, request_id: str) -> RequestRecord | None:
        return self._by_id.get(request_id)

    def recent(self, limit: int = 20) -> list[RequestRecord]:
        """The latest requests, newest first."""
        return list(reversed(self._recent))[:limit]

    def errors(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(reversed(self._errors))[:limit]

    def series(self, seconds: int = 120, window: int = 5) -> list[dict[str, Any]]:
        """One point per `window` seconds over the last `seconds`: request and token rates, TTFT and TBT
        percentiles over the requests that finished in the window, KV transfer throughput, failures."""
        now = int(self._clock())
        count = max(1, seconds // window)
        buckets = {s.at: s for s in self._seconds}
        points = []
        for end in range(now - (count - 1) * window, now + 1, window):
            group = [buckets[t] for t in range(end - window + 1, end + 1) if t in buckets]
            ttft = sorted(x for s in group for x in s.ttft)
            tbt = sorted(x for s in group for x in s.tbt)
            points.append(
                {
                    "at": end,
                    "requests_per_s": sum(s.finished for s in group) / window,
                    "failures_per_s": sum(s.failed for s in group) / window,
                    "tokens_per_s": sum(s.output_tokens for s in group) / window,
                    "transfer_bytes_per_s": sum(s.transfer_bytes for s in group) / window,
                    "ttft_p50_s": _percentile(ttft, 50),
                    "ttft_p99_s": _percentile(ttft, 99),
                    "tbt_p50_s": _percentile(tbt, 50),
                    "tbt_p99_s": _percentile(tbt, 99),
                }
            )
        return points

    def _second(self) -> _Second:
        at = int(self._clock())
        if not self._seconds or self._seconds[-1].at != at:
            self._seconds.append(_Second(at))
        return self._seconds[-1]


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
