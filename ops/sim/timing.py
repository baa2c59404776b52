"""Batch times from the performance model, memoised: a simulation asks for the same few hundred keys 10^5 times."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cluster.perfmodel import PerfGroup, PerfModel, read_measurements

__all__ = ["BatchTimer", "load_timers"]


class BatchTimer:
    """PerfModel's prompt, token and mixed batch times for one hardware, each key computed once.

    iteration_overhead_s is added to every iteration that decodes (token and mixed): the serving system's own
    per-step cost beyond the engine's step (streaming each token out), which an engine profile does not contain."""

    __slots__ = ("_mixed", "_prompt", "_token", "iteration_overhead_s", "model")

    def __init__(self, model: PerfModel, iteration_overhead_s: float = 0.0) -> None:
        self.model = model
        self.iteration_overhead_s = iteration_overhead_s
        self._prompt: dict[int, float] = {}
        self._token: dict[int, float] = {}
        self._mixed: dict[tuple[int, int], float] = {}

    def prompt_s(self, batch_prompt_tokens: int) -> float:
        seconds = self._prompt.get(batch_prompt_tokens)
        if seconds is None:
            seconds = self._prompt[batch_prompt_tokens] = self.model.prompt_time_s(batch_prompt_tokens)
        return seconds

    def token_s(self, batch_size: int) -> float:
        seconds = self._token.get(batch_size)
        if seconds is None:
            seconds = self.model.token_time_s(batch_size) + self.iteration_overhead_s
            self._token[batch_size] = seconds
        return seconds

    def mixed_s(self, prompt_tokens: int, token_batch: int) -> float:
        """A prefill batch alongside `token_batch` decoding sequences (each one advances one token)."""
        if token_batch == 0:
            return self.prompt_s(prompt_tokens)
        key = (prompt_tokens, token_batch)
        seconds = self._mixed.get(key)
        if seconds is None:
            seconds = self.model.mixed_time_s(prompt_tokens, token_batch) + self.iteration_overhead_s
            self._mixed[key] = seconds
        return seconds


def load_timers(
    perf_csv: Path,
    model: str,
    tensor_parallel: int,
    hardware: Iterable[str],
    iteration_overhead_s: float = 0.0,
) -> dict[str, BatchTimer]:
    """One timer per hardware, reading the CSV once; ValueError naming the available groups if one is missing."""
    rows = read_measurements(perf_csv)
    timers: dict[str, BatchTimer] = {}
    for name in dict.fromkeys(hardware):
        group = PerfGroup(model, name, tensor_parallel)
        group_rows = [row for row in rows if row.group == group]
        if not group_rows:
            known = sorted({f"{r.group.model}/{r.group.hardware}/tp{r.group.tensor_parallel}" for r in rows})
            raise ValueError(
                f"{perf_csv}: no measurements for {model}/{name}/tp{tensor_parallel}; "
                f"available: {', '.join(known) or 'none'}"
            )
        timers[name] = BatchTimer(PerfModel.from_measurements(group, group_rows), iteration_overhead_s)
    return timers
