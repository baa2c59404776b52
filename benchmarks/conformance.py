"""Real clients against a live split cluster: GuideLLM and AIPerf each finish a short benchmark with no failed request.

Run by `make conformance`, which first installs guidellm==0.8.1 and aiperf==0.13.0 in virtualenvs of their own under
.cache/conformance/ (never part of `make test`: the installs are large and the runs take minutes). The steps:

1. `splitserve up` on the demo model (1 prefill + 1 decode node, embedded Redis) on free loopback ports, in its own
   process group; wait (bounded) until GET /readyz says a request can be placed.
2. GuideLLM with its defaults (the openai_http backend: streaming chat completions over HTTP/2, /health probed
   first) and its quickstart profile, the sweep (synchronous, throughput, then 8 constant rates between them), each
   benchmark cut short at --requests requests; synthetic 64-token prompts asking for 32 tokens, counted with the demo
   model's own tokenizer.
3. AIPerf with its default synthetic prompts (~550 tokens) at concurrency 2: streaming chat asking for 32 tokens
   (`max_completion_tokens`, `stream_options`), then non-streaming completions (the server's default max_tokens).
4. Stop the cluster: SIGINT to `splitserve up` (it stops its children in order), SIGKILL to the group after 30 s;
   also when a step failed.

Exit status 0 only when both tools exit 0, their own reports count no failed request, and the router's own
`splitserve:requests` counter (GET /metrics, before and after each run) saw only successful requests meanwhile. The
tools' reports and logs stay in .cache/conformance/ (guidellm/, aiperf-chat/, aiperf-completions/, cluster.log).

    python benchmarks/conformance.py [--requests 10] [--guidellm BIN] [--aiperf BIN]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "conformance"
DEMO_MODEL = (
    REPO / ".cache" / "demo-model"
)  # what `splitserve up` serves without --model (made on first start)
MODEL_NAME = "demo-model"
READY_TIMEOUT_S = 180.0  # first start also builds the demo model
STOP_TIMEOUT_S = 30.0
TOOL_TIMEOUT_S = 900.0  # GuideLLM's sweep starts fresh worker processes per benchmark: ~15 s each on 2 cores

# One thread per process: the cluster's three processes and the tools' workers share the machine's cores.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class ConformanceFailure(Exception):
    """A step failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(proc: subprocess.Popen[Any], first: signal.Signals, timeout_s: float) -> None:
    """Send `first` to the group's leader, then SIGKILL the whole group if it is not gone within timeout_s."""
    if proc.poll() is None:
        proc.send_signal(first)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the leader left behind, or the leader itself
    proc.wait()


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConformanceFailure(f"splitserve up exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the nodes register
        time.sleep(0.5)
    raise ConformanceFailure(f"the cluster was not ready within {READY_TIMEOUT_S:.0f} s; see {log}")


@contextmanager
def split_cluster() -> Iterator[str]:
    """A `splitserve up` cluster on free loopback ports; yields its HTTP base URL; stopped on exit, also on failure."""
    http_port, grpc_port = free_port(), free_port()
    log = WORK / "cluster.log"
    cmd = [str(REPO / ".venv" / "bin" / "splitserve"), "up", "--http-port", str(http_port)]
    cmd += ["--grpc-port", str(grpc_port), "--threads-per-node", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **THREAD_ENV},
        )
    try:
        base_url = f"http://127.0.0.1:{http_port}"
        wait_ready(base_url, proc, log)
        print(f"conformance: split cluster ready on {base_url} (log: {log.relative_to(REPO)})", flush=True)
        yield base_url
    finally:
        stop_group(proc, signal.SIGINT, STOP_TIMEOUT_S)


def request_outcomes(base_url: str) -> dict[str, int]:
    """The router's `splitserve:requests` counter by outcome ("ok", or the gRPC status a request ended with)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    outcomes: dict[str, int] = {}
    for match in re.finditer(r'^splitserve:requests_total\{[^}]*outcome="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        outcomes[match[1]] = outcomes.get(match[1], 0) + int(float(match[2]))
    return outcomes


@contextmanager
def server_view(name: str, base_url: str, lines: list[str]) -> Iterator[None]:
    """Check a tool's run from the server's side: every request it placed meanwhile ended ok."""
    before = request_outcomes(base_url)
    yield
    after = request_outcomes(base_url)
    delta = {outcome: after[outcome] - before.get(outcome, 0) for outcome in after}
    failed = {outcome: count for outcome, count in delta.items() if outcome != "ok" and count}
    lines.append(f"server   {name}: {delta.get('ok', 0)} requests ok, failed by outcome: {failed or 'none'}")
    if failed or not delta.get("ok"):
        raise ConformanceFailure(
            f"{name}: the router counted {delta.get('ok', 0)} ok and these failed: {failed}"
        )


def pump(stream: TextIO, log: TextIO) -> None:
    for line in stream:
        sys.stdout.write(line)
        log.write(line)
    sys.stdout.flush()


def run_tool(name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a tool in its own process group, its output both on the console and in cwd/<name>.log."""
    print(f"conformance: {name}: {' '.join(cmd)}", flush=True)
    with (cwd / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None  # stdout=PIPE
        reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConformanceFailure(f"{name} did not finish within {TOOL_TIMEOUT_S:.0f} s") from None
        finally:
            stop_group(proc, signal.SIGTERM, 10.0)  # also its workers, when it timed out or left some behind
            reader.join(timeout=10)
    if rc != 0:
        raise ConformanceFailure(f"{name} exited with {rc}; see {cwd / f'{name}.log'}")


def fresh_dir(path: Path) -> Path:
    """An empty directory, so that a report left by an earlier run is never read as this run's."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_guidellm(binary: str, base_url: str, requests: int) -> list[str]:
    out = fresh_dir(WORK / "guidellm")
    report = out / "benchmarks.json"
    cmd = [binary, "run", "--backend", f"kind=openai_http,target={base_url}", "--profile", "kind=sweep"]
    cmd += [
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--constraint",
        "kind=max_duration,seconds=30",
    ]
    cmd += ["--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32"]
    cmd += ["--tokenizer", f"kind=huggingface_auto,model={DEMO_MODEL}"]
    cmd += ["--output", f"kind=json,path={report}"]  # the console tables come anyway
    cmd += ["--output", f"kind=csv,path={out / 'benchmarks.csv'}", "--disable-progress"]
    run_tool("guidellm", cmd, out, {**os.environ, **THREAD_ENV, "HF_HUB_OFFLINE": "1"})
    return guidellm_summary(json.loads(report.read_text()))


def guidellm_summary(report: dict[str, Any]) -> list[str]:
    """One line per benchmark of GuideLLM's JSON report; raises when a request errored or a benchmark did nothing."""
    lines, failures = [], []
    for bench in report["benchmarks"]:
        config, metrics = bench["config"]["strategy"], bench["metrics"]
        strategy = config["type_"] + (f"@{config['rate']:.2f}" if "rate" in config else "")
        totals = metrics["request_totals"]
        req_s = metrics["requests_per_second"]["successful"]["mean"]
        tok_s = metrics["output_tokens_per_second"]["successful"]["mean"]
        ttft_ms = metrics["time_to_first_token_ms"]["successful"]["median"]
        lines.append(
            f"guidellm {strategy:<14} {totals['successful']:>3} ok {totals['errored']} errored "
            f"{totals['incomplete']} incomplete in {bench['duration']:4.1f} s: {req_s:5.2f} req/s, "
            f"{tok_s:5.1f} output tok/s, TTFT median {ttft_ms:5.1f} ms"
        )
        if totals["errored"] or not totals["successful"]:
            failures.append(f"{strategy}: {totals['errored']} errored, {totals['successful']} successful")
    if not report["benchmarks"]:
        failures.append("no benchmark in the report")
    if failures:
        raise ConformanceFailure("guidellm: " + "; ".join(failures) + "\n" + "\n".join(lines))
    return lines


def run_aiperf(binary: str, base_url: str, requests: int, endpoint: str, streaming: bool) -> str:
    out = fresh_dir(WORK / f"aiperf-{endpoint}")
    cmd = [binary, "profile", "--model", MODEL_NAME, "--url", base_url, "--endpoint-type", endpoint]
    cmd += ["--tokenizer", str(DEMO_MODEL), "--request-count", str(requests), "--concurrency", "2"]
    cmd += ["--request-timeout-seconds", "120", "--artifact-dir", str(out), "--ui", "none"]
    cmd += ["--streaming", "--output-tokens-mean", "32"] if streaming else []
    # AIPerf 0.13 in HF offline mode looks even a local tokenizer directory up in the Hub cache, and fails; online
    # it loads the directory as it is and never reaches the network for it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    run_tool(f"aiperf-{endpoint}", cmd, out, {**env, **THREAD_ENV})
    return aiperf_summary(endpoint, json.loads((out / "profile_export_aiperf.json").read_text()), requests)


def aiperf_summary(endpoint: str, report: dict[str, Any], requests: int) -> str:
    """A line of AIPerf's JSON report; raises when a request failed, or fewer than `requests` completed."""

    def avg(metric: str) -> float:
        return float(report.get(metric, {}).get("avg", 0.0))

    errors = sum(entry["count"] for entry in report.get("error_summary", []))
    completed = int(avg("completed_request_count"))
    duration_s = avg("benchmark_duration")
    # AIPerf counts output tokens by re-tokenizing the text; a random model's text (split UTF-8 sequences become
    # U+FFFD) re-tokenizes to more tokens than were generated, so the server's usage counts are shown too.
    line = (
        f"aiperf {endpoint:<12} {completed:>3} completed {errors} errors ({avg('request_error_rate'):.0f}%) in "
        f"{duration_s:4.1f} s: {avg('request_throughput'):5.2f} req/s, output tok/s "
        f"{avg('total_usage_completion_tokens') / max(duration_s, 1e-9):5.1f} by the server's usage "
        f"({avg('output_token_throughput'):5.1f} re-tokenized), latency mean {avg('request_latency'):5.1f} ms"
    )
    if errors or avg("request_error_rate") or completed < requests or not report.get("is_complete", False):
        raise ConformanceFailure(f"aiperf {endpoint}: {report.get('error_summary')}\n{line}")
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=10, help="requests per GuideLLM benchmark (AIPerf: twice)"
    )
    parser.add_argument("--guidellm", default=str(WORK / "guidellm-venv" / "bin" / "guidellm"))
    parser.add_argument("--aiperf", default=str(WORK / "aiperf-venv" / "bin" / "aiperf"))
    args = parser.parse_args()
    # The tools run in their output directories: relative paths would miss.
    args.guidellm, args.aiperf = os.path.abspath(args.guidellm), os.path.abspath(args.aiperf)
    for tool in (args.guidellm, args.aiperf):
        if not os.access(tool, os.X_OK):
            print(f"conformance: {tool} not found; `make conformance` installs it", file=sys.stderr)
            return 2
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lines: list[str] = []
    try:
        with split_cluster() as base_url:
            with server_view("guidellm", base_url, lines):
                lines += run_guidellm(args.guidellm, base_url, args.requests)
            for endpoint, streaming in (("chat", True), ("completions", False)):
                with server_view(f"aiperf {endpoint}", base_url, lines):
                    lines.append(run_aiperf(args.aiperf, base_url, 2 * args.requests, endpoint, streaming))
    except ConformanceFailure as exc:
        print(f"conformance: FAILED: {exc}", file=sys.stderr)
        return 1
    print("\nconformance: summary (from the tools' JSON reports; `server`: the router's own request counter)")
    print("\n".join(lines))
    print(f"conformance: passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
