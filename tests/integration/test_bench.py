"""`splitserve bench` against a live local cluster (it requires an API key): a time-scaled slice of conv.csv over
HTTP and gRPC, the summary as a table or JSON, and the key never written anywhere.

Tolerance for client vs server TTFT: the client's TTFT includes the server's (measured at the router from arrival to
the first token leaving it) plus loopback transport and client parsing, so per request
    server_ttft - 10 ms <= client_ttft <= server_ttft + 500 ms
(the 10 ms covers the two processes' clock reads; the 500 ms covers scheduling delays on a loaded 2-core machine).
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"
SLICE = ["--trace", str(TRACE), "--num-requests", "16", "--time-scale", "20", "--token-scale", "0.05"]
API_KEY = f"sk-bench-{secrets.token_hex(12)}"
KEY = ["--api-key", API_KEY]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, api_key=API_KEY)
    with LocalCluster(spec) as running:
        yield running


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_trace_slice_completes_and_client_ttft_agrees_with_the_server(
    transport: str, cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    endpoint = (
        f"http://{cluster.http_address}/v1" if transport == "http" else f"grpc://{cluster.router_address}"
    )
    result = bench("--endpoint", endpoint, *KEY, "--tokenizer", str(llama_dir), *SLICE, "--max-context", "512",
                   "--slo-ttft", "5", "--slo-tpot", "1", "--plot", "--out", str(tmp_path / transport))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for png in ("latency_cdf.png", "timeline.png"):
        assert (tmp_path / transport / png).read_bytes().startswith(b"\x89PNG")
    summary = json.loads((tmp_path / transport / "results.json").read_text())["summary"]
    assert summary["completed"] == 16 and summary["failed"] == 0
    assert summary["goodput"] is not None
    with (tmp_path / transport / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    for row in rows:
        client, server = float(row["ttft_s"]), float(row["server_ttft_s"])
        assert server - 0.010 <= client <= server + 0.5, (client, server)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_conversations_resend_each_turn_and_the_server_reuses_the_prefix(
    transport: str, cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    endpoint = (
        f"http://{cluster.http_address}/v1" if transport == "http" else f"grpc://{cluster.router_address}"
    )
    # 3 conversations of 3 turns: 32 shared system tokens, 20-token messages, 8-token answers.
    result = bench("--endpoint", endpoint, *KEY, "--tokenizer", str(llama_dir), "--concurrency", "3",
                   "--num-requests", "9", "--input-len", "20", "--output-len", "8", "--turns", "3",
                   "--system-prompt-len", "32", "--json", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["completed"] == 9 and summary["failed"] == 0
    with (tmp_path / "requests.csv").open() as f:
        lengths = [int(row["prompt_tokens"]) for row in csv.DictReader(f)]
    for conversation in range(3):
        first, second, third = lengths[3 * conversation : 3 * conversation + 3]
        assert abs(first - 52) <= 2  # system + message (the prompt builder is within a token of a length)
        # Each turn resends the previous prompt and its 8-token answer, then a new message (~20 tokens). Over
        # HTTP the answer comes back as text, and the random model's text may re-encode into more tokens.
        most = 30 if transport == "grpc" else 60
        assert 26 <= second - first <= most and 26 <= third - second <= most, lengths
    # Every conversation shares the system prompt's full blocks, and later turns their own earlier ones.
    assert summary["cached_prompt_tokens"] >= 6 * 32 + 6 * 16, summary["cached_prompt_tokens"]


def test_compare_prints_two_runs_side_by_side(cluster: LocalCluster, llama_dir: Path, tmp_path: Path) -> None:
    for name, endpoint in (
        ("http", f"http://{cluster.http_address}/v1"),
        ("grpc", f"grpc://{cluster.router_address}"),
    ):
        result = bench("--endpoint", endpoint, *KEY, "--tokenizer", str(llama_dir), "--concurrency", "4",
                       "--num-requests", "8", "--input-len", "20", "--output-len", "5", "--out", str(tmp_path / name))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    compared = bench(
        "--compare", str(tmp_path / "http" / "results.json"), str(tmp_path / "grpc" / "results.json")
    )
    assert compared.returncode == 0, compared.stderr
    assert "http" in compared.stdout and "grpc" in compared.stdout and "ttft" in compared.stdout.lower()


def test_summary_is_a_table_or_json_and_the_api_key_is_never_written(
    cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    small = ["--tokenizer", str(llama_dir), "--concurrency", "2", "--num-requests", "4", "--input-len", "12",
             "--output-len", "3", "--plot"]  # fmt: skip
    # As --api-key=KEY, and abbreviated (argparse takes `--api-ke`): the words of the command line are recorded.
    table = bench("--endpoint", f"http://{cluster.http_address}/v1", f"--api-key={API_KEY}", *small,
                  "--out", str(tmp_path / "http"))  # fmt: skip
    as_json = bench("--endpoint", f"grpc://{cluster.router_address}", "--api-ke", API_KEY, *small, "--json",
                    "--out", str(tmp_path / "grpc"))  # fmt: skip
    assert table.returncode == 0 and as_json.returncode == 0, (table.stderr[-2000:], as_json.stderr[-2000:])
    rows = dict(line.rsplit(None, 1) for line in table.stdout.splitlines())
    assert rows["completed"] == "4" and rows["failed"] == "0", table.stdout
    assert "\\n" not in table.stdout and "{" not in table.stdout, table.stdout
    summary = json.loads(as_json.stdout)
    assert summary["completed"] == 4 and summary["ttft_s"]["count"] == 4
    recorded = json.loads((tmp_path / "grpc" / "results.json").read_text())["config"]
    assert recorded["api_key_set"] is True
    for result in (table, as_json):
        assert API_KEY not in result.stdout + result.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.name for path in written} >= {"results.json", "requests.csv", "latency_cdf.png"}
    for path in written:
        assert API_KEY.encode() not in path.read_bytes(), f"the API key is in {path}"


def test_a_refused_key_is_one_line_over_http_and_failed_requests_over_grpc(
    cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    wrong = ["--api-key", "not-the-key", "--tokenizer", str(llama_dir), "--concurrency", "2", "--num-requests", "2",
             "--input-len", "8", "--output-len", "2"]  # fmt: skip
    http = bench("--endpoint", f"http://{cluster.http_address}/v1", *wrong, "--out", str(tmp_path / "http"))
    assert http.returncode == 2 and "Traceback" not in http.stderr, http.stderr
    assert http.stderr.strip().count("\n") == 0 and "401" in http.stderr and "--api-key" in http.stderr
    # gRPC has no request to ask first: every request fails, and the run records why.
    grpc = bench("--endpoint", f"grpc://{cluster.router_address}", *wrong, "--out", str(tmp_path / "grpc"))
    assert grpc.returncode == 1, grpc.stderr[-2000:]
    summary = json.loads((tmp_path / "grpc" / "results.json").read_text())["summary"]
    assert summary["failed"] == 2 and set(summary["errors_by_kind"]) == {"grpc_unauthenticated"}
