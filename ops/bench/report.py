"""Results on disk, and two runs side by side.

A run writes two files:
  results JSON   {"schema": "splitserve.bench/1", "config": {...how the run was made...}, "summary": Summary}
                 Non-finite floats (an infinite slowdown) are written as the strings "inf"/"-inf"/"nan".
  requests CSV   one row per request in workload order, the fields of `RequestSample` (times in seconds from the
                 run's first send; an empty cell is None). `read_request_csv` reads it back, e.g. as the
                 baseline of the Splitwise 9-SLO check.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.slo import SPLITWISE_SLO_LIMITS
from ops.bench.metrics import Summary, json_safe
from ops.bench.samples import RequestSample
from ops.bench.stats import Stats

__all__ = [
    "RESULTS_SCHEMA",
    "BenchResults",
    "compare",
    "compare_summaries",
    "load_results",
    "read_request_csv",
    "summary_table",
    "write_request_csv",
    "write_results",
]

RESULTS_SCHEMA = "splitserve.bench/1"
REQUEST_COLUMNS = tuple(f.name for f in dataclasses.fields(RequestSample))
_LATENCIES = (
    ("ttft", "ttft_s"),
    ("tpot", "tpot_s"),
    ("tbt", "tbt_s"),
    ("e2e", "e2e_s"),
    ("server ttft", "server_ttft_s"),
)
_STAT_FIELDS = ("mean", "p50", "p90", "p99", "max")

Row = tuple[str, float | int | str | None, float | int | str | None]


@dataclass(frozen=True, slots=True)
class BenchResults:
    summary: Summary
    config: dict[
        str, Any
    ]  # free-form and JSON-ready: the CLI's settings, endpoint, model, workload description


def write_results(path: str | Path, summary: Summary, config: Mapping[str, Any]) -> Path:
    path = Path(path)
    document = {"schema": RESULTS_SCHEMA, "config": dict(config), "summary": summary.to_dict()}
    path.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load_results(path: str | Path) -> BenchResults:
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: not a splitserve bench results file (schema {RESULTS_SCHEMA})")
    try:
        summary = Summary.from_dict(document["summary"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return BenchResults(summary=summary, config=dict(document.get("config") or {}))


def write_request_csv(path: str | Path, samples: Sequence[RequestSample]) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(REQUEST_COLUMNS)
        for sample in samples:
            writer.writerow(
                ["" if v is None else repr(v) if isinstance(v, float) else v for v in _values(sample)]
            )
    return path


def read_request_csv(path: str | Path) -> list[RequestSample]:
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = tuple(next(reader, ()))
        if header != REQUEST_COLUMNS:
            raise ValueError(f"{path}: line 1: expected the columns {','.join(REQUEST_COLUMNS)}")
        samples = []
        for row in reader:
            if len(row) != len(REQUEST_COLUMNS):
                raise ValueError(
                    f"{path}: line {reader.line_num}: expected {len(REQUEST_COLUMNS)} fields, got {len(row)}"
                )
            try:
                samples.append(
                    RequestSample(**{c: _PARSE[c](v) for c, v in zip(REQUEST_COLUMNS, row, strict=True)})
                )
            except ValueError as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
    return samples


def compare(
    a: str | Path | BenchResults, b: str | Path | BenchResults, *, labels: tuple[str, str] = ("A", "B")
) -> str:
    """A plain-text table of every metric of two runs (results files or loaded results): A, B and B/A."""
    first = a if isinstance(a, BenchResults) else load_results(a)
    second = b if isinstance(b, BenchResults) else load_results(b)
    return compare_summaries(first.summary, second.summary, labels=labels)


def summary_table(summary: Summary) -> str:
    """One run's metrics as plain text, a metric a line (the rows `compare` prints for two runs)."""
    table = [(name, _format(value)) for name, value, _ in _rows(summary, summary)]
    width = max(len(name) for name, _ in table)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in table)


def compare_summaries(a: Summary, b: Summary, *, labels: tuple[str, str] = ("A", "B")) -> str:
    rows = _rows(a, b)
    table = [("metric", labels[0], labels[1], f"{labels[1]}/{labels[0]}")]
    table += [(name, _format(x), _format(y), _ratio(x, y)) for name, x, y in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _rows(a: Summary, b: Summary) -> list[Row]:
    rows: list[Row] = [
        ("requests", a.requests, b.requests),
        ("completed", a.completed, b.completed),
        ("failed", a.failed, b.failed),
    ]
    for kind in sorted(set(a.errors_by_kind) | set(b.errors_by_kind)):
        rows.append((f"  errors: {kind}", a.errors_by_kind.get(kind, 0), b.errors_by_kind.get(kind, 0)))
    rows += [
        ("duration (s)", a.duration_s, b.duration_s),
        ("request throughput (req/s)", a.request_throughput, b.request_throughput),
        ("input throughput (tok/s)", a.input_throughput, b.input_throughput),
        ("output throughput (tok/s)", a.output_throughput, b.output_throughput),
        ("prompt tokens", a.total_prompt_tokens, b.total_prompt_tokens),
        ("output tokens", a.total_output_tokens, b.total_output_tokens),
    ]
    if a.cached_prompt_tokens is not None or b.cached_prompt_tokens is not None:
        rows.append(("prompt tokens from cache", a.cached_prompt_tokens, b.cached_prompt_tokens))
    for label, name in _LATENCIES:
        sa: Stats = getattr(a, name)
        sb: Stats = getattr(b, name)
        if sa.count == 0 and sb.count == 0:
            continue
        for stat in _STAT_FIELDS:
            rows.append((f"{label} {stat} (ms)", _ms(getattr(sa, stat)), _ms(getattr(sb, stat))))
    if a.goodput or b.goodput:
        rows.append(("good requests", _attr(a.goodput, "good_requests"), _attr(b.goodput, "good_requests")))
        rows.append(("goodput (req/s)", _attr(a.goodput, "goodput_rps"), _attr(b.goodput, "goodput_rps")))
        rows.append(("SLO attainment", _attr(a.goodput, "attainment"), _attr(b.goodput, "attainment")))
    if a.slo_check or b.slo_check:
        rows += _slo_rows(a, b)
    return rows


def _slo_rows(a: Summary, b: Summary) -> list[Row]:
    slow_a = {(r.metric, r.percentile): r.slowdown for r in a.slo_check.rows} if a.slo_check else {}
    slow_b = {(r.metric, r.percentile): r.slowdown for r in b.slo_check.rows} if b.slo_check else {}
    rows: list[Row] = [
        (f"slowdown {metric} p{q} (x)", slow_a.get((metric, q)), slow_b.get((metric, q)))
        for metric, q in SPLITWISE_SLO_LIMITS
    ]
    passed = [None if s.slo_check is None else ("yes" if s.slo_check.passed else "no") for s in (a, b)]
    rows.append(("9 SLOs met", passed[0], passed[1]))
    return rows


def _attr(obj: object, name: str) -> float | int | None:
    return None if obj is None else getattr(obj, name)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _format(value: float | int | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.3f}"


def _ratio(a: float | int | str | None, b: float | int | str | None) -> str:
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}"


def _values(sample: RequestSample) -> list[Any]:
    return [getattr(sample, column) for column in REQUEST_COLUMNS]


def _optional_float(text: str) -> float | None:
    return float(text) if text else None


_PARSE: dict[str, Callable[[str], Any]] = {
    "index": int,
    "start_s": float,
    "end_s": float,
    "prompt_tokens": int,
    "output_tokens": int,
    "ttft_s": _optional_float,
    "tpot_s": _optional_float,
    "e2e_s": _optional_float,
    "tbt_max_s": _optional_float,
    "arrivals": int,
    "server_ttft_s": _optional_float,
    "error": lambda text: text or None,
}
