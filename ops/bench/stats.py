"""Percentiles and summary statistics, numpy's linear method, with +inf allowed (a failed request's slowdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of one metric over a run; every value is None when there were no samples."""

    count: int
    mean: float | None
    min: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if len(values) == 0:
            return cls(count=0, mean=None, min=None, p50=None, p90=None, p99=None, max=None)
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        p50, p90, p99 = (percentile_of_sorted(ordered, q) for q in PERCENTILES)
        return cls(
            count=len(ordered),
            mean=float(ordered.mean()),
            min=float(ordered[0]),
            p50=p50,
            p90=p90,
            p99=p99,
            max=float(ordered[-1]),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, as `numpy.percentile(values, q)` (method "linear") computes it."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return percentile_of_sorted(np.sort(np.asarray(values, dtype=np.float64)), q)


def percentile_of_sorted(ordered: np.ndarray, q: float) -> float:
    """Linear interpolation between the closest ranks of an ascending array: rank = q/100 * (n - 1)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    if np.isnan(ordered).any():
        raise ValueError("percentile of values that include NaN")
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    weight = rank - low
    a, b = float(ordered[low]), float(ordered[high])
    if weight == 0.0 or a == b:
        return a
    if math.isinf(b):  # any weight on +inf is +inf; the formulas below would give inf - inf = NaN
        return b
    # numpy's two-sided lerp (exact at both ends), so that results match it to the last bit.
    return b - (b - a) * (1.0 - weight) if weight >= 0.5 else a + (b - a) * weight
