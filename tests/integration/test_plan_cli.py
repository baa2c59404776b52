"""`splitserve plan` end to end: a real process, real simulations of a few hundred conv.csv requests, tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
PERF = DATA / "splitwise-perf-model" / "perf_model.csv"
BASE = ["--trace", str(CONV), "--perf-model", str(PERF), "--limit", "300", "--rate-tolerance", "0.1"]


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "plan", *args], capture_output=True, text=True, timeout=150, env=env
    )


def test_iso_power_plan_writes_table_json_and_plot(tmp_path: Path) -> None:
    designs = ["--design", "baseline-a100", "--design", "splitwise-aa", "--custom", "my-ha=dgx-h100:dgx-a100"]
    out = plan(*BASE, *designs, "--budget", "8xdgx-a100", "--jobs", "2",
               "--output", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.splitlines()
    for design in ("baseline-a100", "splitwise-aa", "my-ha"):
        assert any(line.startswith(design) for line in table), out.stdout
    assert "as quoted in docs/splitwise-facts.md) beside this run" in out.stdout
    assert "splitwise-aa sustains more load than baseline-a100" in out.stdout
    assert "plan: splitwise-aa" in out.stderr  # progress
    assert (tmp_path / "plan.png").read_bytes().startswith(b"\x89PNG")
    document = json.loads((tmp_path / "plan.json").read_text())
    assert document["feasible"] is True and document["goal"] == "iso-power"
    by_name = {d["design"]: d for d in document["designs"]}
    assert by_name["baseline-a100"]["best"]["colocated"] == 8
    for design in by_name.values():
        best = design["best"]
        assert best["power_w"] <= 8 * 6500.0 and best["trial"]["passed"]
        assert best["rps"] == max(s["rps"] for s in design["scanned"])
    assert document["simulations"] == sum(d["simulations"] for d in document["designs"])


def test_a_budget_too_small_for_any_design_is_an_explicit_no_feasible_result(tmp_path: Path) -> None:
    out = plan(*BASE, "--design", "splitwise-hh", "--design", "baseline-a100", "--budget", "5000",
               "--output", str(tmp_path / "plan.json"))  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "no feasible configuration" in out.stdout and "nothing fits the budget" in out.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["feasible"] is False


def test_min_cost_meets_the_target(tmp_path: Path) -> None:
    out = plan(*BASE, "--design", "splitwise-hh", "--goal", "min-cost", "--target-rps", "5", "--max-machines", "8",
               "--output", str(tmp_path / "plan.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    best = json.loads((tmp_path / "plan.json").read_text())["designs"][0]["best"]
    assert best["rps"] == 5.0 and best["trial"]["passed"] and best["prefill"] + best["decode"] <= 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--design", "splitwise-zz"], "unknown design 'splitwise-zz'"),
        (["--custom", "x=dgx-a100:tpu-v9"], "unknown machine type 'tpu-v9'"),
        (["--budget", "40xdgx-z"], "unknown machine type 'dgx-z'"),
        (["--goal", "min-power"], "--target-rps"),
        (["--model", "gpt-9"], "no measurements for gpt-9"),
        (["--power-basis", "paper", "--custom", "c=cpu"], "--power-basis rated"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    out = plan(*BASE, "--design", "splitwise-aa", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("splitserve plan: error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_malformed_trace_or_perf_model_is_one_line(tmp_path: Path) -> None:
    bad_trace = tmp_path / "trace.csv"
    bad_trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,lots,3\n")
    bad_perf = tmp_path / "perf.csv"
    bad_perf.write_text("model,hardware\nbloom-176b,a100-80gb\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for trace, perf in ((bad_trace, PERF), (CONV, bad_perf), (empty, PERF), (CONV, empty)):
        out = plan("--trace", str(trace), "--perf-model", str(perf), "--design", "splitwise-aa")
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.startswith("splitserve plan: error: ") and out.stderr.count("\n") == 1, out.stderr


def test_a_plan_past_its_time_limit_stops_with_one_line() -> None:
    # Spawned workers need far longer than a millisecond to start, so the first wait is past the deadline.
    out = plan(*BASE, "--design", "splitwise-aa", "--jobs", "2", "--time-limit", "0.001")
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(
        "splitserve plan: error: the plan did not finish within --time-limit 0.001 s"
    )
    assert out.stderr.count("\n") == 1


def test_a_plan_in_splitwise_sims_model(tmp_path: Path) -> None:
    """--fidelity splitwise-sim: the same search over SplitwiseSim's model, its schedulers named in the header."""
    out = plan(*BASE, "--design", "splitwise-hh", "--budget", "4xdgx-h100", "--fidelity", "splitwise-sim",
               "--output", str(tmp_path / "plan.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "policy SplitwiseSim's (mixed_pool, token_jsq), fidelity splitwise-sim" in out.stdout
    assert any(line.startswith("splitwise-hh") for line in out.stdout.splitlines()), out.stdout
    document = json.loads((tmp_path / "plan.json").read_text())
    assert document["feasible"] is True
    refused = plan(*BASE, "--design", "splitwise-hh", "--fidelity", "splitwise-sim", "--policy", "cost")
    assert refused.returncode == 2 and "placement policy has no meaning" in refused.stderr
