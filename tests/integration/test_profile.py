"""`splitserve profile`: a real engine measured over small sweeps, written as a perf-model CSV that cluster.perfmodel
reads back; which points a sweep keeps; one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.perfmodel import PerfModel, read_measurements
from engine.errors import InvalidRequestError
from ops.profiling.results import PERF_CSV_COLUMNS
from ops.profiling.sweep import EngineLimits, ProfilePoint, SweepSpec, plan_sweep

pytestmark = pytest.mark.timeout(300)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Small enough for a 2-layer, hidden-64 model to profile in a few seconds; 4096 exceeds its 2048-token context.
SMALL_SWEEP = ["--prompt-sizes", "32,64,4096", "--batch-sizes", "1,2,4", "--token-sweep", "16",
               "--token-size", "8", "--anchor-prompt", "64", "--repeats", "2", "--threads", "1"]  # fmt: skip


def profile(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "profile", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )


def test_profile_writes_the_published_csv_layout_and_perfmodel_reads_it(
    llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "perf.csv"
    result = profile("--model", str(llama_dir), "--output", str(out), "--name", "tiny", *SMALL_SWEEP)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped prompt 4096 x batch 1, 8 tokens" in result.stderr

    with out.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == PERF_CSV_COLUMNS
        rows = list(reader)
    points = [(int(r["prompt_size"]), int(r["batch_size"]), int(r["token_size"])) for r in rows]
    # Anchor first, then the prompt, batch and token sweeps; each kept point twice (--repeats 2).
    expected = [(64, 1, 8), (32, 1, 8), (64, 2, 8), (64, 4, 8), (64, 1, 16)]
    assert points == [p for p in expected for _ in range(2)]
    for row in rows:
        prompt_ms, token_ms, e2e_ms = (float(row[c]) for c in ("prompt_time", "token_time", "e2e_time"))
        assert prompt_ms > 0 and token_ms > 0
        assert e2e_ms == pytest.approx(prompt_ms + (int(row["token_size"]) - 1) * token_ms)
        assert (row["model"], row["hardware"], row["tensor_parallel"]) == ("tiny", "cpu", "1")
        assert float(row["peak_power"]) == float(row["average_power"]) == 0.0

    model = PerfModel.from_csv(out, "tiny", "cpu", 1)
    assert model.prompt_curve.keys == (32.0, 64.0, 128.0, 256.0)  # batch prompt tokens: 32, 64, 2x64, 4x64
    assert model.token_curve.keys == (1.0, 2.0, 4.0)
    assert model.average_power_fraction is None
    assert len(read_measurements(out)) == 10


def _limits(max_sequence_tokens: int = 2048, kv_blocks: int = 1000) -> EngineLimits:
    return EngineLimits(max_sequence_tokens=max_sequence_tokens, kv_blocks=kv_blocks, block_size=16)


def test_sweep_crosses_at_the_anchor_and_measures_it_once() -> None:
    spec = SweepSpec(prompt_sizes=(128, 512), batch_sizes=(1, 2), token_sweep=(128, 256))
    plan = plan_sweep(spec, _limits())
    assert plan.points == (
        ProfilePoint(512, 1, 128),
        ProfilePoint(128, 1, 128),
        ProfilePoint(512, 2, 128),
        ProfilePoint(512, 1, 256),
    )
    assert plan.skipped == ()


def test_points_over_the_context_or_the_kv_pool_are_skipped_with_a_reason() -> None:
    spec = SweepSpec(prompt_sizes=(128, 1000), batch_sizes=(1, 2, 8), token_sweep=(600,))
    # 8 x ceil(640 / 16) = 320 blocks > 200; 1000 + 128 and 512 + 600 tokens > 1024.
    plan = plan_sweep(spec, _limits(max_sequence_tokens=1024, kv_blocks=200))
    assert ProfilePoint(512, 2, 128) in plan.points
    assert len(plan.skipped) == 3
    assert any("prompt 512 x batch 8" in note and "raise --kv-cache-mb" in note for note in plan.skipped)
    assert any(
        "prompt 1000 x batch 1" in note and "exceed the limit of 1024" in note for note in plan.skipped
    )


def test_an_infeasible_anchor_or_a_single_batch_size_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="anchor point"):
        plan_sweep(SweepSpec((128,), (1, 2), ()), _limits(max_sequence_tokens=600))
    with pytest.raises(InvalidRequestError, match="distinct batch sizes"):
        plan_sweep(SweepSpec((128, 256), (1,), ()), _limits())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/missing"], "model directory does not exist"),
        (["--output", "{tmp}/no/such/dir/perf.csv"], "does not exist"),
        (["--anchor-prompt", "3000"], "anchor point"),
        (["--batch-sizes", "1"], "at least 2"),
        (["--prompt-sizes", "64,abc"], "expected an integer, got 'abc'"),
        (["--token-size", "1"], "must be >= 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    args: list[str], message: str, llama_dir: Path, tmp_path: Path
) -> None:
    base = ["--model", str(llama_dir), "--output", str(tmp_path / "perf.csv"), "--prompt-sizes", "32,64",
            "--batch-sizes", "1,2", "--token-sweep", "", "--token-size", "4", "--anchor-prompt", "64",
            "--repeats", "1"]  # fmt: skip
    # The case's flags come last: argparse keeps the last value of a repeated flag.
    result = profile(*base, *(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert error_lines[0].startswith("splitserve profile: error:")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "perf.csv").exists()
