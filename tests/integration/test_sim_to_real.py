"""Sim-to-real: `splitserve profile` on this machine, then one time-scaled slice of conv.csv on a real split cluster
(`splitserve up`'s processes: prefill node, decode node, router) and in the simulator (ops.sim), fed the profile.
The median TTFT and the median per-request TBT (mean time between tokens) must agree within 25%.

Status: a timed comparison, so not part of `make test` (no timed assertion gates CI); run it with
`pytest -m timing tests/integration/test_sim_to_real.py`. Record on the shared 2-core VM: 2026-11-22, 9 runs in a
row, all within 25% (sim/real medians: TTFT 0.76-0.96x, TBT 0.83-1.11x). Six earlier runs gave TBT 0.59-0.95x
and passed about half the time; since then the engine stopped snapshotting the scheduler around every step, and the
machine may have been quieter (how much each contributed is unknown). The same engine step on this VM still flips
between ~13 and ~21 ms from one few-second stretch to the next (a bare engine loop, nothing else running), which is
most of the spread that is left.

What the simulator models: prompt batches of up to 2048 tokens timed by the profile's prompt curve, decode batches
timed by its token curve, FCFS queues, KV transfer time from link bandwidth. The nodes get the same batching rules
(`--max-batched-tokens 2048`: no prompt of the slice is chunked; `--max-seqs 64`). One input comes from the live
cluster rather than the profile: the serving system's own latency per request (router placement, the decode node's
Reserve, the Prefill RPC, the first token's way back: ~20-30 ms here), measured as the median TTFT of six requests
sent alone (other prompts, 128 tokens) minus the profile's time for such a prompt, and given to the simulator as
`request_overhead_s`. An engine profile cannot contain it; the replay then tests what the simulator predicts: the
slice's queueing, batching and lengths.

What it does not model, with what each cost on the 2-core CPU machine this test was written on:
- A node's engine thread shares the GIL with its gRPC event loop, and Reserve and the KV hand-over wait for the
  step in progress: a decode step in a node is ~5% slower than in `splitserve profile`.
- Two node processes sharing two cores with the router, the load generator and Redis: when requests overlap, the
  compute threads are preempted by the others' per-token work.
- KV transfer: NIXL over loopback moves a 1,000-token prompt's KV (8 MB) in ~3 ms, which link_gbps reproduces;
  gloo would add 100+ ms of per-layer round trips through its TCPStore, so the cluster runs NIXL here.
- The machine: the same memory-bound decode step varies by up to +-30% from one ten-second stretch to the next
  on this shared virtual machine, so the profile and the replay, a minute apart, can see different machines.
Why 25%: at this size a prompt of the slice (median ~190 tokens) costs ~85 ms and a decode step ~20 ms, the
effects above stay within 5-15%, and at this load (16 requests, one every ~2.5 s) requests seldom overlap; machine
noise takes the rest. Each cause found while writing this test moved a median by 20-100%: chunked 512-token
prefill, gloo's round trips, prompts that hit the warm-up's prefix cache, and two the product now fixes (nodes
page-faulting their attention temporaries back on every step, see cluster/allocator.py; a decode node polling its
transport 500 times a second while no KV was due). A looser bound would let such a cause through; a
tighter one would fail on noise alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.perfmodel import PerfModel
from engine.config import ModelConfig
from engine.tiny_model import make_tiny_model
from ops.bench.report import read_request_csv
from ops.bench.workload import load_azure_trace
from ops.launcher import ClusterSpec, LocalCluster
from ops.sim import ClusterDesign, Pool, SimConfig, simulate

# A timed comparison: outside `make test` (see "Status" above); run it with `pytest -m timing` on a quiet machine.
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow, pytest.mark.timing]

METRICS = ("ttft", "tbt")
# Requests sent alone: they warm the nodes and measure the cluster's own costs per request and per iteration.
WARM_REQUESTS, WARM_PROMPT, WARM_OUTPUT = 6, 128, 32
TOLERANCE = 0.25  # |sim / real - 1| for each median; why 25%: see the module docstring
TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"
NAME = "sim2real"
# bfloat16: on this CPU its decode step grows smoothly with the batch (float32 jumps 2x from batch 1 to 2, which
# turns small timing differences into large ones) and a prompt costs ~0.45 ms per token.
MODEL_SHAPE = dict(
    arch="llama", layers=8, hidden=768, heads=12, kv_heads=4, vocab=2048, seed=11, dtype="bfloat16"
)
KV_BYTES_PER_ELEMENT = 2  # bfloat16
SLICE = dict(start=0, limit=16, time_scale=0.25, token_scale=0.5, max_context=1024)
KV_CACHE_MB = 256
MAX_BATCH_TOKENS = 2048  # the simulator's Splitwise prompt-batch limit, given to the real prefill node too
MAX_SEQS = 64
NODE_ARGS = [
    "--max-batched-tokens",
    str(MAX_BATCH_TOKENS),
    "--max-seqs",
    str(MAX_SEQS),
    "--kv-cache-mb",
    str(KV_CACHE_MB),
]
KV_LINK_GBPS = 20.0  # NIXL on loopback: ~3 ms for 8 MB, measured
# Anchored near the slice's median prompt (~190 tokens) and output (~40 tokens), so the token curve is measured
# at the context lengths the replay decodes at.
PROFILE_SWEEP = ["--prompt-sizes", "64,128,256,512,960", "--batch-sizes", "1,2,4", "--token-sweep", "",
                 "--anchor-prompt", "256", "--token-size", "48", "--repeats", "3", "--threads", "1"]  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=200, env=env
    )


def bench(cluster: LocalCluster, model_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("bench", "--endpoint", f"grpc://{cluster.router_address}", "--tokenizer", str(model_dir),
               "--out", str(out), "--timeout", "60", *args)  # fmt: skip


def kv_bytes_per_token(model_dir: Path) -> int:
    config = ModelConfig.from_dir(model_dir)
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * KV_BYTES_PER_ELEMENT


def replay_on_cluster(model_dir: Path, out: Path) -> dict[str, float]:
    """Median TTFT and TBT of the slice on a real prefill + decode cluster, one torch thread per node."""
    spec = ClusterSpec(
        model_dir=model_dir,
        prefill=1,
        decode=1,
        grpc_port=0,
        http_port=0,
        threads_per_node=1,
        kv_backend="nixl",
        node_args=NODE_ARGS,
    )
    with LocalCluster(spec) as cluster:
        # The profile times only warmed-up steps; warm the nodes too. Seed 1: its prompts share no prefix with
        # the replay's (seed 0), or the nodes' prefix cache would serve part of the replay.
        warm = bench(cluster, model_dir, out / "warm", "--concurrency", "1", "--num-requests", str(WARM_REQUESTS),
                     "--input-len", str(WARM_PROMPT), "--output-len", str(WARM_OUTPUT), "--seed", "1")  # fmt: skip
        assert warm.returncode == 0, warm.stderr[-2000:]
        replay = bench(cluster, model_dir, out / "real", "--trace", str(TRACE),
                       "--start", str(SLICE["start"]), "--num-requests", str(SLICE["limit"]),
                       "--time-scale", str(SLICE["time_scale"]), "--token-scale", str(SLICE["token_scale"]),
                       "--max-context", str(SLICE["max_context"]))  # fmt: skip
        assert replay.returncode == 0, replay.stderr[-2000:]
    summary = json.loads((out / "real" / "results.json").read_text())["summary"]
    assert summary["completed"] == SLICE["limit"] and summary["failed"] == 0
    samples = read_request_csv(out / "real" / "requests.csv")
    alone = read_request_csv(out / "warm" / "requests.csv")
    return {
        "ttft": float(np.median([s.ttft_s for s in samples if s.ttft_s is not None])),
        "tbt": float(np.median([s.tpot_s for s in samples if s.tpot_s is not None])),
        "alone_ttft": float(np.median([s.ttft_s for s in alone if s.ttft_s is not None])),
        "alone_tbt": float(np.median([s.tpot_s for s in alone if s.tpot_s is not None])),
    }


def replay_in_simulator(perf_csv: Path, model_dir: Path, alone: dict[str, float]) -> dict[str, float]:
    requests = load_azure_trace(TRACE, **SLICE)  # type: ignore[arg-type]
    # The cluster's own costs, from the requests sent alone: per request, their TTFT minus the profile's time for
    # their prompt; per decode iteration, their time between tokens minus the profile's batch-1 token time.
    profiled = PerfModel.from_csv(perf_csv, NAME, "cpu", 1)
    overhead_s = max(0.0, alone["alone_ttft"] - profiled.prompt_time_s(WARM_PROMPT))
    iteration_s = max(0.0, alone["alone_tbt"] - profiled.token_time_s(1))
    config = SimConfig(
        perf_csv=perf_csv,
        model=NAME,
        tensor_parallel=1,
        hardware={"cpu": "cpu"},
        reference_hardware="cpu",
        max_batch_tokens=MAX_BATCH_TOKENS,
        max_batch_size=MAX_SEQS,
        kv_capacity_tokens=KV_CACHE_MB * 1024 * 1024 // kv_bytes_per_token(model_dir),
        kv_bytes_per_token=kv_bytes_per_token(model_dir),
        link_gbps=KV_LINK_GBPS,
        request_overhead_s=overhead_s,
        iteration_overhead_s=iteration_s,
    )
    design = ClusterDesign("cpu-split", prefill=Pool("cpu", 1), decode=Pool("cpu", 1))
    result = simulate(design, requests, config)
    assert len(result.ttft_s) == SLICE["limit"]
    return {
        "ttft": float(np.median(result.ttft_s)),
        "tbt": float(np.nanmedian(result.tbt_s)),
        "overhead": overhead_s,
        "iteration": iteration_s,
    }


def profile(model_dir: Path, output: Path) -> list[str]:
    """Profile rows of the CSV `splitserve profile` wrote (header excluded)."""
    done = cli("profile", "--model", str(model_dir), "--output", str(output), "--name", NAME,
               "--kv-cache-mb", str(KV_CACHE_MB), *PROFILE_SWEEP)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return output.read_text().splitlines()


def test_simulator_matches_a_real_split_cluster_on_median_ttft_and_tbt(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "model", **MODEL_SHAPE)  # type: ignore[arg-type]
    # Profiled before and after the replay, pooled (PerfModel takes the median over all trials of a point): the
    # speed of this shared machine drifts by up to +-30% within a minute, and bracketing the replay keeps the
    # profile's machine the replay's machine on average.
    before = profile(model_dir, tmp_path / "before.csv")
    real = replay_on_cluster(model_dir, tmp_path)
    after = profile(model_dir, tmp_path / "after.csv")
    perf = tmp_path / "perf.csv"
    perf.write_text("\n".join(before + after[1:]) + "\n")
    simulated = replay_in_simulator(perf, model_dir, real)

    report = ", ".join(
        f"{m.upper()} real {real[m] * 1000:.1f} ms, sim {simulated[m] * 1000:.1f} ms ({simulated[m] / real[m]:.2f}x)"
        for m in METRICS
    )
    report += (
        f"; measured alone: {simulated['overhead'] * 1000:.1f} ms per request, "
        f"{simulated['iteration'] * 1000:.1f} ms per decode iteration"
    )
    print(f"sim-to-real medians: {report}")
    for metric in METRICS:
        assert abs(simulated[metric] / real[metric] - 1) <= TOLERANCE, report
