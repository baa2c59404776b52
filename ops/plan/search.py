"""Coarse-to-fine search for the best point of a one-dimensional scan where each score costs simulations.

Splitwise grid-searches (#prompt x #token) machines. Along a budget frontier (or over prefill pool sizes) the
score usually rises while the short pool is the bottleneck and falls once the other pool is, so instead of every
point this scores a few evenly spaced ones, then repeatedly halves the gaps on both sides of the best point so far
until its neighbours are adjacent: about coarse_points + 2 * log2(length / coarse_points) scores in all. The
scan is exact for a unimodal score and a good local optimum otherwise; every scored point is kept for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def coarse_to_fine(
    length: int, score_batch: Callable[[Sequence[int]], Sequence[float]], coarse_points: int
) -> dict[int, float]:
    """Scores (higher is better) of the indices in range(length) the search visited.

    score_batch scores several indices at once, so that they can be simulated in parallel."""
    if coarse_points < 2:
        raise ValueError(f"coarse points must be >= 2, got {coarse_points}")
    scores: dict[int, float] = {}

    def visit(indices: Sequence[int]) -> None:
        new = sorted({i for i in indices if i not in scores})
        if new:
            scores.update(zip(new, score_batch(new), strict=True))

    if length <= 0:
        return scores
    visit(evenly_spaced(length, coarse_points))
    while True:
        best = best_index(scores)
        visited = sorted(scores)
        position = visited.index(best)
        candidates = []
        if position > 0 and best - visited[position - 1] > 1:
            candidates.append((visited[position - 1] + best) // 2)
        if position + 1 < len(visited) and visited[position + 1] - best > 1:
            candidates.append((best + visited[position + 1]) // 2)
        if not candidates:
            return scores
        visit(candidates)


def evenly_spaced(length: int, points: int) -> list[int]:
    """`points` indices spread over range(length), both ends included (all of them when length <= points)."""
    if length <= points:
        return list(range(length))
    return sorted({round(k * (length - 1) / (points - 1)) for k in range(points)})


def best_index(scores: dict[int, float]) -> int:
    """The highest score's index; the lowest such index on ties."""
    return min(scores, key=lambda i: (-scores[i], i))
