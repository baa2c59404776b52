"""Property-based fuzzing of the router's gRPC Inference service (issue 12, item 10): 1,100 messages, GenerateRequests
with any value their fields' wire types allow and random bytes sent past the client's serializer; every answer is
OK or a status naming the client's fault (INVALID_ARGUMENT, NOT_FOUND, ...), never UNKNOWN/INTERNAL/UNAVAILABLE or a
hang; afterwards every KV pool is free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.launcher import ClusterSpec, LocalCluster
from tests.adversarial.fuzz_runs import fuzz_grpc
from tests.integration.test_cluster_disaggregated import assert_pools_drain

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 1100


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, threads_per_node=1)
    with LocalCluster(spec) as running:
        yield running


def test_generated_grpc_messages_get_ok_or_a_client_error(cluster: LocalCluster, llama_dir: Path) -> None:
    tally = fuzz_grpc(cluster.router_address, llama_dir.name, EXAMPLES)
    counts = tally.as_dict()
    assert not tally.findings, "\n".join(tally.findings)
    assert sum(c["sent"] for c in counts.values()) >= 1000, counts
    assert counts["Generate"]["2xx"] > 20 and counts["Generate"]["4xx"] > 100, counts
    assert counts["Generate (raw bytes)"]["4xx"] > 100, counts
    assert_pools_drain(cluster, expected_nodes=2)
