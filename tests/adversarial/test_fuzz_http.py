"""Property-based fuzzing of the router's OpenAI HTTP endpoint (issue 12, item 10): 2,100 generated requests
(well-typed, ill-typed, huge numbers, weird strings, deep nesting, non-JSON bytes, wrong content types); every answer
is 2xx, or 4xx with an OpenAI-shaped JSON error; no 5xx, no hang; afterwards every KV pool is free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.launcher import ClusterSpec, LocalCluster
from tests.adversarial.fuzz_runs import fuzz_http
from tests.integration.test_cluster_disaggregated import assert_pools_drain

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 2100


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, threads_per_node=1)
    with LocalCluster(spec) as running:
        yield running


def test_generated_http_requests_never_get_5xx_or_hang(cluster: LocalCluster, llama_dir: Path) -> None:
    tally = fuzz_http(f"http://{cluster.http_address}", llama_dir.name, EXAMPLES)
    counts = tally.as_dict()
    assert not tally.findings, "\n".join(tally.findings)
    assert sum(c["sent"] for c in counts.values()) >= 2000, counts
    assert all(c["5xx"] == 0 and c["hangs"] == 0 for c in counts.values()), counts
    # The strategies reach both the happy path and the refusals of both endpoints.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert counts[path]["2xx"] > 50 and counts[path]["4xx"] > 200, counts
    assert_pools_drain(cluster, expected_nodes=2)
