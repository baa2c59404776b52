"""`splitserve profile`: measure this machine's prompt and token latency into a perf-model CSV.

    splitserve profile --model .cache/demo-model --output perf.csv --threads 1
    splitserve simulate --perf-model perf.csv --model demo-model ...   # the simulator reads it back

Progress and notes (skipped points) go to stderr, one line each; the CSV is written once every point is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from ops.cli_errors import require_dir
from ops.profiling.results import Trial, write_perf_csv
from ops.profiling.sweep import ProfilePoint, SweepSpec, plan_sweep

if TYPE_CHECKING:
    from ops.profiling.measure import EngineProbe

# Untimed trials before the sweep: the first steps of a fresh engine pay one-off allocation and kernel set-up costs.
WARM_UP_TRIALS = 2
WARM_UP_TOKENS = 16


def main(args: argparse.Namespace) -> int:
    require_dir(args.model, "--model", "model directory")
    _check_output(args.output)
    if args.threads:
        # Before torch is imported, so that its intra-op pool starts at this size.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from cluster.allocator import keep_freed_memory
    from ops.profiling.measure import EngineProbe, ProbeSettings

    keep_freed_memory()  # as nodes do, so that the profile times the steps a node runs

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SweepSpec(
        prompt_sizes=args.prompt_sizes,
        batch_sizes=args.batch_sizes,
        token_sweep=args.token_sweep,
        anchor_prompt=args.anchor_prompt,
        anchor_tokens=args.token_size,
    )
    candidates = spec.candidates()
    settings = ProbeSettings(
        dtype=args.dtype,
        device=args.device,
        kv_cache_mb=args.kv_cache_mb,
        max_batch_size=max(p.batch_size for p in candidates),
        max_batch_prompt_tokens=max(p.batch_prompt_tokens for p in candidates),
    )
    started = time.perf_counter()
    probe = EngineProbe(args.model, settings)
    plan = plan_sweep(spec, probe.limits)
    for note in plan.skipped:
        _say(note)
    warm_up = ProfilePoint(spec.anchor_prompt, 1, min(spec.anchor_tokens, WARM_UP_TOKENS))
    for _ in range(WARM_UP_TRIALS):
        probe.measure(warm_up)
    by_point = _measure_in_rounds(probe, plan.points, args.repeats)
    for point, point_trials in by_point.items():
        _say(_summary(point, point_trials))
    name = args.name or args.model.resolve().name
    rows = write_perf_csv(args.output, name, args.hardware, [t for ts in by_point.values() for t in ts])
    _say(
        f"wrote {rows} rows ({len(plan.points)} points x {args.repeats}) for {name}/{args.hardware} to "
        f"{args.output} in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _measure_in_rounds(
    probe: EngineProbe, points: Sequence[ProfilePoint], repeats: int
) -> dict[ProfilePoint, list[Trial]]:
    """Each round measures every point once. On a shared machine speed drifts over seconds (other tenants, memory
    bandwidth), so trials of one point taken back to back would all land in one phase of that drift and the curves
    would bend where the machine did; spread over the rounds, every point samples the whole run alike."""
    by_point: dict[ProfilePoint, list[Trial]] = {point: [] for point in points}
    for round_number in range(1, repeats + 1):
        for point in points:
            by_point[point].append(probe.measure(point))
        _say(f"round {round_number}/{repeats} done")
    return by_point


def _check_output(path: Path) -> None:
    """Fail before the (long) measurement rather than after it."""
    if path.is_dir():
        raise InvalidRequestError(f"--output {path} is a directory; give a CSV file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidRequestError(f"--output {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidRequestError(f"--output {path}: not writable")


def _summary(point: ProfilePoint, trials: list[Trial]) -> str:
    prompt_ms = statistics.median(t.prompt_time_s for t in trials) * 1000
    token_ms = statistics.median(t.token_time_s for t in trials) * 1000
    return f"{point.describe()}: prompt {prompt_ms:.1f} ms, token {token_ms:.2f} ms (median of {len(trials)})"


def _say(line: str) -> None:
    print(f"splitserve profile: {line}", file=sys.stderr, flush=True)
