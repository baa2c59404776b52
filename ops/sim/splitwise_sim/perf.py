"""SplitwiseSim's performance model: batch times interpolated over "batch tokens", as its database predictor does.

Per (model, hardware, tensor parallel) group of the perf CSV, every row is keyed on prompt_size x batch_size
("batch tokens"), whatever sweep it belongs to, and the median prompt_time and token_time of each key become two
piecewise-linear curves, extrapolated linearly beyond both ends (first and last segment). An iteration then costs:
- only prompts: the prompt curve at the sum of their prompt sizes;
- only tokens: the token curve at the number of sequences (each is one batch token). The CSV's token rows sit at
  128..8192 batch tokens (batch 1 with prompts 128..8192, batch 2..16 with prompt 512), so a decode batch of
  B < 128 sequences lies below the first key and is extrapolated from the batch-1 rows of 128- and 256-token
  prompts: TBT barely grows with batch size;
- prompts and tokens: the prompt curve at prompt sizes + sequences, times 1.1.

The arithmetic is the one scipy's interp1d(kind="linear", fill_value="extrapolate") does, step for step, so that
times match SplitwiseSim's to the last bit: slope = (y_hi - y_lo) / (x_hi - x_lo), y = slope * (x - x_lo) + y_lo,
with the segment found by a left bisection clipped to [1, n - 1]. Repeated keys reduce to their median (the mean
of the middle two for an even count, as pandas computes it).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from cluster.perfmodel import PerfGroup, read_measurements

__all__ = ["MIXED_BATCH_FACTOR", "Curve", "SplitwisePerf", "load_perf"]

MIXED_BATCH_FACTOR = 1.1


class Curve:
    """A piecewise-linear function through (x, y) points, extrapolated from its end segments."""

    __slots__ = ("_cache", "x", "y")

    def __init__(self, x: Sequence[int], y: Sequence[float]) -> None:
        if len(x) < 2:
            raise ValueError("a curve needs at least two distinct batch-token keys")
        self.x, self.y = list(x), list(y)
        self._cache: dict[int, float] = {}

    def __call__(self, key: int) -> float:
        value = self._cache.get(key)
        if value is None:
            x, y = self.x, self.y
            hi = min(max(bisect.bisect_left(x, key), 1), len(x) - 1)
            lo = hi - 1
            slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
            value = self._cache[key] = slope * (key - x[lo]) + y[lo]
        return value


class SplitwisePerf:
    """The prompt and token curves of one hardware, and the iteration time of a batch on it."""

    __slots__ = ("hardware", "prompt", "token")

    def __init__(self, hardware: str, prompt: Curve, token: Curve) -> None:
        self.hardware, self.prompt, self.token = hardware, prompt, token

    def iteration_s(self, prompt_tokens: int, token_tasks: int, prompt_tasks: int) -> float:
        batch_tokens = prompt_tokens + token_tasks
        if token_tasks == 0:
            return self.prompt(batch_tokens)
        if prompt_tasks == 0:
            return self.token(batch_tokens)
        return self.prompt(batch_tokens) * MIXED_BATCH_FACTOR


def load_perf(
    path: Path, model: str, tensor_parallel: int, hardware: Sequence[str]
) -> dict[str, SplitwisePerf]:
    """One SplitwisePerf per hardware; ValueError naming the CSV's groups when one is missing."""
    rows = read_measurements(path)
    perf: dict[str, SplitwisePerf] = {}
    for name in dict.fromkeys(hardware):
        group = PerfGroup(model, name, tensor_parallel)
        prompt_times: dict[int, list[float]] = defaultdict(list)
        token_times: dict[int, list[float]] = defaultdict(list)
        for row in rows:
            if row.group == group:
                key = row.prompt_size * row.batch_size
                prompt_times[key].append(row.prompt_time_s)
                token_times[key].append(row.token_time_s)
        if not prompt_times:
            known = sorted({f"{r.group.model}/{r.group.hardware}/tp{r.group.tensor_parallel}" for r in rows})
            raise ValueError(
                f"{path}: no measurements for {model}/{name}/tp{tensor_parallel}; available: {', '.join(known)}"
            )
        keys = sorted(prompt_times)
        perf[name] = SplitwisePerf(
            name,
            Curve(keys, [_median(prompt_times[k]) for k in keys]),
            Curve(keys, [_median(token_times[k]) for k in keys]),
        )
    return perf


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2  # pandas' median of an even count
