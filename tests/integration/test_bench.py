"""`splitserve bench` against a live local cluster: a time-scaled slice of conv.csv over HTTP and gRPC.

Tolerance for client vs server TTFT: the client's TTFT includes the server's (measured at the router from arrival to
the first token leaving it) plus loopback transport and client parsing, so per request
    server_ttft - 10 ms <= client_ttft <= server_ttft + 500 ms
(the 10 ms covers the two processes' clock reads; the 500 ms covers scheduling delays on a loaded 2-core machine).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"
SLICE = ["--trace", str(TRACE), "--num-requests", "16", "--time-scale", "20", "--token-scale", "0.05"]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
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
    result = bench("--endpoint", endpoint, "--tokenizer", str(llama_dir), *SLICE, "--max-context", "512",
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


def test_compare_prints_two_runs_side_by_side(cluster: LocalCluster, llama_dir: Path, tmp_path: Path) -> None:
    for name, endpoint in (
        ("http", f"http://{cluster.http_address}/v1"),
        ("grpc", f"grpc://{cluster.router_address}"),
    ):
        result = bench("--endpoint", endpoint, "--tokenizer", str(llama_dir), "--concurrency", "4",
                       "--num-requests", "8", "--input-len", "20", "--output-len", "5", "--out", str(tmp_path / name))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    compared = bench(
        "--compare", str(tmp_path / "http" / "results.json"), str(tmp_path / "grpc" / "results.json")
    )
    assert compared.returncode == 0, compared.stderr
    assert "http" in compared.stdout and "grpc" in compared.stdout and "ttft" in compared.stdout.lower()


def test_unreachable_endpoint_fails_cleanly(llama_dir: Path, tmp_path: Path) -> None:
    result = bench("--endpoint", "grpc://127.0.0.1:9", "--tokenizer", str(llama_dir), "--concurrency", "2",
                   "--num-requests", "2", "--timeout", "5", "--out", str(tmp_path / "down"))  # fmt: skip
    assert result.returncode == 1
    summary = json.loads((tmp_path / "down" / "results.json").read_text())["summary"]
    assert summary["failed"] == 2 and summary["errors_by_kind"]
