"""What a benchmark sends and when: request lengths plus an arrival process.

Two load modes, as load testers usually offer them:
  open    each request has an arrival offset (seconds from the start of the run) and is sent then, whether or not
          earlier ones have finished: a trace replay or a Poisson process. `concurrency`, if set, caps the requests
          in flight (a request due while the cap is reached waits for a slot).
  closed  no arrival times (`arrivals=None` in `make_workload`): `concurrency` requests are kept in flight, the next
          one is sent as soon as one finishes. Arrival offsets are 0.0 and ignored.

Azure LLM inference traces (the Splitwise paper's, https://github.com/Azure/AzurePublicDataset) are CSV files with
the columns `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP like `2023-11-16 18:17:03.9799600` (7 fractional
digits, more than `datetime` keeps, so the fraction is parsed here).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

from ops.bench.prompts import BuiltPrompt, PromptBuilder

__all__ = [
    "AZURE_COLUMNS",
    "BuiltPrompt",
    "LoadMode",
    "PromptBuilder",
    "TraceRequest",
    "Workload",
    "check_requests",
    "fixed_concurrency",
    "load_azure_trace",
    "make_workload",
    "poisson_arrivals",
    "synthetic_lengths",
    "trace_workload",
]

LoadMode = Literal["open", "closed"]
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # offset from the run's first request, in seconds; 0.0 and ignored in closed mode
    prompt_tokens: int  # >= 1
    output_tokens: int  # >= 1; the number of tokens to generate (sent as max_tokens, EOS ignored)


def check_requests(requests: Sequence[TraceRequest]) -> None:
    """What a simulation needs of its requests: arrivals finite and in order, prompt and output >= 1 token."""
    previous = -math.inf
    for i, request in enumerate(requests):
        if not (math.isfinite(request.arrival_s) and request.arrival_s >= previous):
            raise ValueError(f"request {i}: arrival offsets must be finite and non-decreasing")
        if request.prompt_tokens < 1 or request.output_tokens < 1:
            raise ValueError(f"request {i}: prompt and output lengths must be >= 1")
        previous = request.arrival_s


@dataclass(frozen=True, slots=True)
class Workload:
    requests: tuple[TraceRequest, ...]  # in send order; position i is request i in every result
    mode: LoadMode
    concurrency: int | None = None  # closed: requests in flight (required); open: optional cap

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', not {self.mode!r}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {self.concurrency}")
        if self.mode == "closed" and self.concurrency is None:
            raise ValueError("a closed-loop workload needs a concurrency")
        previous = 0.0
        for i, request in enumerate(self.requests):
            if request.prompt_tokens < 1 or request.output_tokens < 1:
                raise ValueError(f"request {i}: prompt and output lengths must be >= 1, got {request}")
            if not request.arrival_s >= previous:  # also rejects NaN
                raise ValueError(f"request {i}: arrival offsets must be >= 0 and non-decreasing")
            previous = request.arrival_s

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)


def make_workload(
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    *,
    arrivals: Sequence[float] | None,
    concurrency: int | None = None,
) -> Workload:
    """Pair lengths with arrival offsets (open loop), or with `arrivals=None` keep `concurrency` in flight."""
    if len(prompt_tokens) != len(output_tokens):
        raise ValueError(f"{len(prompt_tokens)} prompt lengths but {len(output_tokens)} output lengths")
    if arrivals is not None and len(arrivals) != len(prompt_tokens):
        raise ValueError(f"{len(arrivals)} arrival offsets for {len(prompt_tokens)} requests")
    offsets = [0.0] * len(prompt_tokens) if arrivals is None else [float(a) for a in arrivals]
    requests = tuple(
        TraceRequest(arrival_s=a, prompt_tokens=int(p), output_tokens=int(o))
        for a, p, o in zip(offsets, prompt_tokens, output_tokens, strict=True)
    )
    return Workload(requests, "closed" if arrivals is None else "open", concurrency)


def fixed_concurrency(
    prompt_tokens: Sequence[int], output_tokens: Sequence[int], concurrency: int
) -> Workload:
    """A closed loop: `concurrency` requests in flight until all are sent."""
    return make_workload(prompt_tokens, output_tokens, arrivals=None, concurrency=concurrency)


def trace_workload(requests: Sequence[TraceRequest], *, max_concurrency: int | None = None) -> Workload:
    """Replay a trace open loop at its own arrival times (already scaled by `load_azure_trace`)."""
    return Workload(tuple(requests), "open", max_concurrency)


def poisson_arrivals(rate_per_s: float, n: int, seed: int, *, burstiness: float = 1.0) -> list[float]:
    """Arrival offsets of `n` requests at a mean `rate_per_s`; the first request is sent at 0.0.

    Gaps are Gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson process, < 1 burstier, > 1 more
    regular (vLLM's `--burstiness`). A rate of `math.inf` sends everything at once. Same seed, same offsets.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, not {rate_per_s}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, not {burstiness}")
    if n == 0:
        return []
    if math.isinf(rate_per_s):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def synthetic_lengths(
    n: int, *, prompt_tokens: int, output_tokens: int, range_ratio: float = 0.0, seed: int = 0
) -> tuple[list[int], list[int]]:
    """`n` (prompt, output) lengths drawn uniformly from [len*(1-r), len*(1+r)], at least 1 each."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), not {range_ratio}")
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("prompt_tokens and output_tokens must be >= 1")
    rng = np.random.default_rng(seed)

    def draw(center: int) -> list[int]:
        low = max(1, math.floor(center * (1.0 - range_ratio)))
        high = max(low, math.ceil(center * (1.0 + range_ratio)))
        return [int(x) for x in rng.integers(low, high, size=n, endpoint=True)]

    return draw(prompt_tokens), draw(output_tokens)


def load_azure_trace(
    path: str | Path,
    *,
    time_scale: float = 1.0,
    token_scale: float = 1.0,
    max_context: int | None = None,
    limit: int | None = None,
    start: int = 0,
) -> list[TraceRequest]:
    """Read an Azure LLM inference trace: rows `start` .. `start+limit-1` (0-based, header not counted).

    Arrival offsets are seconds since the first row read, divided by `time_scale` (10 replays 10x faster).
    Token counts are multiplied by `token_scale` and rounded, then made to fit `max_context`: the output keeps its
    length (up to max_context - 1, so that decode load stays as in the trace) and the prompt is cut to the rest.
    Both are at least 1. Malformed rows raise ValueError naming the file and line.
    """
    _check_trace_args(time_scale, token_scale, max_context, limit, start)
    path = Path(path)
    requests: list[TraceRequest] = []
    first: tuple[int, float] | None = None
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        columns = _header_columns(path, next(reader, None))
        row_index = -1
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            row_index += 1
            if row_index < start:
                continue
            if limit is not None and len(requests) >= limit:
                break
            where = f"{path}: line {reader.line_num}"
            (whole_s, fraction_s), context, generated = _parse_row(row, columns, where)
            if first is None:
                first = (whole_s, fraction_s)
            offset = ((whole_s - first[0]) + (fraction_s - first[1])) / time_scale
            if requests and offset < requests[-1].arrival_s:
                raise ValueError(f"{where}: TIMESTAMP goes back in time; the trace must be sorted by time")
            prompt, output = _scale_lengths(context, generated, token_scale, max_context)
            requests.append(TraceRequest(arrival_s=offset, prompt_tokens=prompt, output_tokens=output))
    return requests


def _check_trace_args(
    time_scale: float, token_scale: float, max_context: int | None, limit: int | None, start: int
) -> None:
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be a finite number > 0, not {time_scale}")
    if not (token_scale > 0 and math.isfinite(token_scale)):
        raise ValueError(f"token_scale must be a finite number > 0, not {token_scale}")
    if max_context is not None and max_context < 2:
        raise ValueError(f"max_context must be >= 2 (one prompt and one output token), not {max_context}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if start < 0:
        raise ValueError(f"start must be >= 0, not {start}")


def _header_columns(path: Path, header: list[str] | None) -> tuple[int, int, int]:
    if header is None:
        raise ValueError(f"{path}: empty file; expected the header {','.join(AZURE_COLUMNS)}")
    names = [name.strip().lstrip("\ufeff") for name in header]
    missing = [c for c in AZURE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: line 1: missing column(s) {', '.join(missing)}; found {','.join(names)}")
    ts, ctx, gen = (names.index(c) for c in AZURE_COLUMNS)
    return ts, ctx, gen


def _parse_row(
    row: list[str], columns: tuple[int, int, int], where: str
) -> tuple[tuple[int, float], int, int]:
    ts_col, ctx_col, gen_col = columns
    if len(row) <= max(columns):
        raise ValueError(f"{where}: expected {max(columns) + 1} fields, got {len(row)}: {','.join(row)!r}")
    return (
        _parse_timestamp(row[ts_col].strip(), where),
        _parse_count(row[ctx_col], "ContextTokens", where),
        _parse_count(row[gen_col], "GeneratedTokens", where),
    )


def _parse_timestamp(text: str, where: str) -> tuple[int, float]:
    """(whole seconds since 0001-01-01, fraction): kept apart because a float of ~6e10 s has only ~1e-5 s left."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{where}: TIMESTAMP {text!r} is not like '2023-11-16 18:17:03.9799600'")
    try:
        whole = datetime.fromisoformat(match.group(1).replace("T", " "))
    except ValueError as exc:
        raise ValueError(f"{where}: TIMESTAMP {text!r}: {exc}") from None
    digits = match.group(2) or "0"
    seconds = whole.toordinal() * 86400 + whole.hour * 3600 + whole.minute * 60 + whole.second
    return seconds, int(digits) / 10 ** len(digits)


def _parse_count(text: str, column: str, where: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{where}: {column} {text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{where}: {column} {value} is negative")
    return value


def _scale_lengths(
    context: int, generated: int, token_scale: float, max_context: int | None
) -> tuple[int, int]:
    prompt = max(1, math.floor(context * token_scale + 0.5))
    output = max(1, math.floor(generated * token_scale + 0.5))
    if max_context is not None:
        output = min(output, max_context - 1)
        prompt = min(prompt, max_context - output)
    return prompt, output
