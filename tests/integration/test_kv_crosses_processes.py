"""The KV a prefill node process computes really lands in the decode side's reserved blocks, value for value.

This test process plays the decode node (its engine's pool is inspectable here); the prefill node is a real OS
process reached over gRPC, writing through the real transport. The expected values come from a local engine
computing the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from cluster.auth import TOKEN_METADATA_KEY
from engine import kernels
from engine.config import EngineConfig, EngineRole
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer import create_transport
from kvtransfer.notifications import parse_kv_done
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import cluster_pb2_grpc
from splitserve.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(300)
PROMPT = list(range(7, 7 + 150))  # 150 tokens: 9 full blocks and a partial one


@pytest.fixture(scope="module", params=["torch", "nixl"])
def prefill_node(request: pytest.FixtureRequest, llama_dir: Path) -> Iterator[tuple[str, str, str]]:
    if request.param == "nixl":
        pytest.importorskip("nixl")
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=1, decode=0, routers=0, kv_backend=request.param,
        node_args=["--one-piece-below", "0"],  # layer by layer, the path that overlaps compute
    )  # fmt: skip
    with LocalCluster(spec) as cluster:
        yield cluster.by_role("prefill")[0].address, request.param, cluster.cluster_token


def test_decode_blocks_hold_the_prefill_nodes_values(
    prefill_node: tuple[str, str, str], llama_dir: Path
) -> None:
    address, backend, cluster_token = prefill_node
    params = SamplingParams(max_tokens=4, temperature=0.0)
    decode = LLMEngine(llama_dir, EngineConfig(role=EngineRole.DECODE, num_kv_blocks=64))
    transport = create_transport(backend, "test-decode")  # without a token: it takes any peer
    try:
        transport.register(decode.kv_layers)
        dst = decode.reserve("crossing", PROMPT, params)
        with grpc.insecure_channel(address) as channel:
            reply = cluster_pb2_grpc.PrefillNodeStub(channel).Prefill(
                cpb.PrefillRequest(
                    request_id="crossing",
                    prompt_token_ids=PROMPT,
                    sampling=pb.SamplingParameters(max_tokens=4, temperature=0.0),
                    decode_node_id="test-decode",
                    decode_transport_descriptor=transport.local_descriptor(),
                    decode_block_ids=dst,
                    deadline_seconds=60,
                ),
                timeout=90,
                metadata=[(TOKEN_METADATA_KEY, cluster_token)],  # nodes serve cluster members only
            )
        assert _kv_done_arrives(transport, "crossing")
        expected_first, expected = _local_prompt_kv(llama_dir, params)
        assert reply.first_token.token_id == expected_first
        positions = torch.arange(len(PROMPT))
        for layer, want in enumerate(expected):
            got = decode.kv_layers[layer][torch.tensor(dst)]  # [blocks, 2, bs, KVH, D]
            got = got.transpose(0, 1).flatten(1, 2)[:, positions]  # [2, tokens, KVH, D]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        untouched = sorted(set(range(64)) - set(dst))
        assert torch.count_nonzero(decode.kv_layers[0][torch.tensor(untouched)]) == 0
    finally:
        transport.close()


def _kv_done_arrives(transport, request_id: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(parse_kv_done(payload) == request_id for _, payload in transport.notifications()):
            return True
        time.sleep(0.005)
    return False


def _local_prompt_kv(model: Path, params: SamplingParams) -> tuple[int, list[torch.Tensor]]:
    """First token and per-layer [2, tokens, KVH, D] KV of PROMPT, computed by a prefill engine in this process."""
    local = LLMEngine(model, EngineConfig(role=EngineRole.PREFILL, num_kv_blocks=64))
    local.add_request("local", PROMPT, params)
    handoff = None
    while handoff is None:
        handoff = next((out.kv for out in local.step() if out.kv is not None), None)
    ids = torch.tensor(handoff.block_ids, dtype=torch.int32)
    kv = [
        kernels.gather_blocks(layer, ids).transpose(0, 1).flatten(1, 2)[:, : len(PROMPT)]
        for layer in local.kv_layers
    ]
    return handoff.first_token_id, kv
