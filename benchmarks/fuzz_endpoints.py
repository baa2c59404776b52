"""Fuzz a router's HTTP and gRPC endpoints with generated hostile inputs and print the answers per endpoint.

The same strategies as the fuzz tests (tests/adversarial/fuzz_inputs.py), at scale and with a chosen seed. A good
router answers 2xx/4xx (gRPC: OK or a client-fault status) to everything; the figures to watch are 5xx and hangs.
`run_fuzz` is also what benchmarks/chaos.py calls against its own cluster.

    python benchmarks/fuzz_endpoints.py [--count 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.tiny_model import make_tiny_model  # noqa: E402
from ops.launcher import ClusterSpec, LocalCluster  # noqa: E402
from tests.adversarial.fuzz_runs import fuzz_grpc, fuzz_http  # noqa: E402


def run_fuzz(http_address: str, grpc_address: str, count: int, seed: int, model: str | None = None) -> dict:
    """Send `count` generated inputs to each endpoint family (HTTP, gRPC); counts per endpoint:
    {endpoint: {"sent", "2xx", "4xx", "5xx", "hangs"}} plus "findings" (the first bad cases) and "seconds".

    `model` is the served model's name (default: the one /v1/models lists)."""
    model = model or _served_model(http_address)
    started = time.monotonic()
    http = fuzz_http(f"http://{http_address}", model, count, seed=seed)
    grpc = fuzz_grpc(grpc_address, model, count, seed=seed)
    counts: dict = {**http.as_dict(), **grpc.as_dict()}
    counts["findings"] = http.findings + grpc.findings
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


def _served_model(http_address: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{http_address}/v1/models", timeout=10) as response:
        return str(json.load(response)["data"][0]["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs per endpoint family (HTTP, gRPC)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "fuzz-model", layers=2, hidden=64, heads=4, kv_heads=2)
        spec = ClusterSpec(model_dir=model, prefill=1, decode=1, grpc_port=0, http_port=0)
        with LocalCluster(spec) as cluster:
            result = run_fuzz(cluster.http_address, cluster.router_address, args.count, args.seed)
    findings = result.pop("findings")
    seconds = result.pop("seconds")
    print(f"{'endpoint':<24} {'sent':>7} {'2xx':>7} {'4xx':>7} {'5xx':>7} {'hangs':>7}")
    for endpoint, row in result.items():
        print(f"{endpoint:<24} " + " ".join(f"{row[k]:>7}" for k in ("sent", "2xx", "4xx", "5xx", "hangs")))
    print(f"{seconds} s; findings: {len(findings)}")
    for finding in findings:
        print("  " + finding)


if __name__ == "__main__":
    main()
