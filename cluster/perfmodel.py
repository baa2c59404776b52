"""Splitwise's performance model: batch latencies predicted from the measured points in perf_model.csv.

The router and the simulator use this module, so it depends on the standard library and numpy only.

What the CSV holds (per model, hardware and tensor-parallel group): three one-dimensional sweeps through the point
prompt_size=512, batch_size=1, token_size=128, each point measured 5 times: prompt_size 128..8192 (batch 1),
batch_size 1..64 (prompt 512) and token_size 128..8192 (prompt 512, batch 1). prompt_time is the time of the
prefill iteration for the whole batch; token_time is the time of one decode iteration (e2e = prompt_time +
(token_size - 1) * token_time holds on the rows).

How we predict, as the Splitwise simulator does (linear interpolation over the batch's token count):
- prompt phase: keyed on the batch's prompt tokens, prompt_size * batch_size. The prompt and batch sweeps both feed
  this curve (e.g. 1024 tokens is measured both as 1x1024 and as 2x512; their trials are pooled).
- token phase: keyed on batch_size, the number of sequences each producing one token. In the data, token_time moves
  with batch_size (about 30 -> 50 ms on H100, batch 1 -> 64) but stays flat across the prompt-size and token-size
  sweeps (context length 128..8192 changes it by a few percent), so context length is not a key; the batch-1 point
  pools all batch-1 trials.
- mixed prompt+token batch: each decode sequence adds one token to the prefill batch, times 1.1 (the Splitwise
  simulator's mixed-batch factor).
Repeated trials of one key are reduced to their median, which ignores the occasional slow outlier trial.
Below the smallest measured key we clamp to the first point: at 128-512 prompt tokens the measured times are flat
(fixed per-iteration cost: weights are read once per forward pass), and a linear extrapolation of two nearly equal,
noisy points can slope either way. Above the largest key we extrapolate linearly from the last two points, where
times grow about linearly with tokens (prefill is compute-bound).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Splitwise simulator: a batch mixing prompt and token work runs 1.1x the prompt-only batch (data README).
MIXED_BATCH_FACTOR = 1.1
# PerfSummary fits prefill over batches up to this many tokens: where machine-level batches live (<= 2048, one
# long prompt beyond), so the line is closest where placement predicts most; prefill grows faster than linearly.
SUMMARY_PROMPT_TOKENS = 4096

# The columns of perf_model.csv, in its order (`splitserve profile` writes the same file).
PERF_CSV_COLUMNS = (
    "model",
    "hardware",
    "prompt_size",
    "batch_size",
    "token_size",
    "peak_power",
    "average_power",
    "prompt_time",
    "token_time",
    "e2e_time",
    "tensor_parallel",
)


@dataclass(frozen=True, slots=True)
class PerfGroup:
    model: str  # e.g. "llama2-70b"
    hardware: str  # e.g. "h100-80gb"
    tensor_parallel: int  # GPUs one model instance spans


@dataclass(frozen=True, slots=True)
class Measurement:
    """One CSV row; times in seconds, powers as the CSV's fraction of rated power (0 where not measured)."""

    group: PerfGroup
    prompt_size: int
    batch_size: int
    token_size: int
    prompt_time_s: float
    token_time_s: float
    peak_power: float
    average_power: float


@dataclass(frozen=True, slots=True)
class Curve:
    """A piecewise-linear curve over sorted, distinct keys: clamped below, linearly extrapolated above."""

    keys: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.keys) < 2 or len(self.keys) != len(self.values):
            raise ValueError("a curve needs at least two points and one value per key")
        if any(b <= a for a, b in zip(self.keys, self.keys[1:], strict=False)):
            raise ValueError("curve keys must be strictly increasing")

    def at(self, key: float) -> float:
        if key <= self.keys[-1]:
            return float(np.interp(key, self.keys, self.values))
        (k0, k1), (v0, v1) = self.keys[-2:], self.values[-2:]
        return v1 + (v1 - v0) * (key - k1) / (k1 - k0)

    @classmethod
    def from_samples(cls, samples: dict[int, list[float]]) -> Curve:
        keys = sorted(samples)
        return cls(tuple(float(k) for k in keys), tuple(float(np.median(samples[k])) for k in keys))


@dataclass(frozen=True, slots=True)
class PerfModel:
    group: PerfGroup
    prompt_curve: Curve  # batch prompt tokens -> seconds for the prefill iteration
    token_curve: Curve  # decode batch size -> seconds for one decode iteration
    # Median over the measured points of the CSV's average_power (fraction of rated power); None where the CSV
    # has no power for this group (only A100 rows carry power, per the data README).
    average_power_fraction: float | None

    @classmethod
    def from_csv(cls, path: str | Path, model: str, hardware: str, tensor_parallel: int) -> PerfModel:
        group = PerfGroup(model, hardware, tensor_parallel)
        rows = [row for row in read_measurements(path) if row.group == group]
        if not rows:
            known = ", ".join(f"{g.model}/{g.hardware}/tp{g.tensor_parallel}" for g in available(path))
            raise ValueError(
                f"{path}: no measurements for {model}/{hardware}/tp{tensor_parallel}; available: {known}"
            )
        return cls.from_measurements(group, rows)

    @classmethod
    def from_measurements(cls, group: PerfGroup, rows: list[Measurement]) -> PerfModel:
        prompt: dict[int, list[float]] = defaultdict(list)
        token: dict[int, list[float]] = defaultdict(list)
        powers = [row.average_power for row in rows if row.average_power > 0]
        for row in rows:
            prompt[row.prompt_size * row.batch_size].append(row.prompt_time_s)
            token[row.batch_size].append(row.token_time_s)
        return cls(
            group,
            Curve.from_samples(prompt),
            Curve.from_samples(token),
            float(np.median(powers)) if powers else None,
        )

    def prompt_time_s(self, batch_prompt_tokens: int) -> float:
        """Seconds for one prefill iteration over a batch holding batch_prompt_tokens prompt tokens in all."""
        _check_count("batch_prompt_tokens", batch_prompt_tokens)
        return self.prompt_curve.at(batch_prompt_tokens)

    def token_time_s(self, batch_size: int) -> float:
        """Seconds for one decode iteration of batch_size sequences, each producing one token."""
        _check_count("batch_size", batch_size)
        return self.token_curve.at(batch_size)

    def mixed_time_s(self, prompt_tokens: int, token_batch: int) -> float:
        """Seconds for one iteration holding prompt_tokens of prefill and token_batch decoding sequences.

        A batch with only one kind of work is timed as that kind, without the mixed-batch factor."""
        if prompt_tokens < 0 or token_batch < 0 or prompt_tokens + token_batch == 0:
            raise ValueError(
                f"need a non-empty batch, got prompt_tokens={prompt_tokens}, token_batch={token_batch}"
            )
        if token_batch == 0:
            return self.prompt_time_s(prompt_tokens)
        if prompt_tokens == 0:
            return self.token_time_s(token_batch)
        return MIXED_BATCH_FACTOR * self.prompt_curve.at(prompt_tokens + token_batch)

    def summary(self) -> PerfSummary:
        """The model as two straight lines (least squares over the measured keys), for vectorised placement."""
        prompt_fixed, prompt_slope = _line(self.prompt_curve, up_to=SUMMARY_PROMPT_TOKENS)
        token_fixed, token_slope = _line(self.token_curve)
        return PerfSummary(prompt_fixed, prompt_slope, token_fixed, token_slope)


@dataclass(frozen=True, slots=True)
class PerfSummary:
    """A node's latency as two lines: what a node registers and what placement policies predict with.

    Coarser than PerfModel (no curvature), but a router evaluates it for every node of a pool in a few vector
    operations; the simulator times batches with the full PerfModel."""

    prompt_fixed_s: float
    prompt_per_token_s: float
    token_fixed_s: float
    token_per_seq_s: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.prompt_fixed_s, self.prompt_per_token_s, self.token_fixed_s, self.token_per_seq_s)

    def prompt_time_s(self, batch_prompt_tokens: float) -> float:
        return self.prompt_fixed_s + self.prompt_per_token_s * batch_prompt_tokens

    def token_time_s(self, batch_size: float) -> float:
        return self.token_fixed_s + self.token_per_seq_s * batch_size


def _line(curve: Curve, up_to: float = float("inf")) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through a curve's points (keys <= up_to, at least two)."""
    keys, values = np.asarray(curve.keys), np.asarray(curve.values)
    n = max(2, int(np.count_nonzero(keys <= up_to)))
    slope, intercept = np.polyfit(keys[:n], values[:n], 1)
    return max(0.0, float(intercept)), max(0.0, float(slope))


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def available(path: str | Path) -> list[PerfGroup]:
    """The (model, hardware, tensor_parallel) groups measured in the CSV, sorted."""
    groups = {row.group for row in read_measurements(path)}
    return sorted(groups, key=lambda g: (g.model, g.hardware, g.tensor_parallel))


def read_measurements(path: str | Path) -> list[Measurement]:
    """Every row of a perf_model.csv; a missing column or bad value raises ValueError naming file and line."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in PERF_CSV_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}")
            return [_parse_row(path, reader.line_num, row) for row in reader]
    except OSError as exc:
        raise ValueError(f"{path}: cannot read performance data: {exc}") from exc


def _parse_row(path: Path, line: int, row: dict[str, str]) -> Measurement:
    try:
        group = PerfGroup(row["model"], row["hardware"], int(row["tensor_parallel"]))
        sizes = [int(row[c]) for c in ("prompt_size", "batch_size", "token_size")]
        floats = [float(row[c]) for c in ("prompt_time", "token_time", "peak_power", "average_power")]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: line {line}: {exc}") from exc
    if min(sizes) < 1 or not all(math.isfinite(x) and x >= 0 for x in floats):
        raise ValueError(f"{path}: line {line}: sizes must be >= 1 and times/powers finite and >= 0")
    (prompt_size, batch_size, token_size), (prompt_ms, token_ms, peak, average) = sizes, floats
    return Measurement(
        group, prompt_size, batch_size, token_size, prompt_ms / 1000.0, token_ms / 1000.0, peak, average
    )
