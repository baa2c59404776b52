"""An attacker on the network, without credentials, against a cluster started with an API key and a cluster token.

Every door a node or Redis opens is tried: each internal RPC of each node (Reserve, Decode, Abort, Prefill), the
public Inference service a node serves (colocated Generate), Redis, and the KV transport's store. Each attempt must
get nothing: UNAUTHENTICATED, a Redis AUTH error, a refused pair. The keyed path through the router must still give
the engine's exact output, and no secret may end up in a bench's results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import redis

from cluster.auth import TOKEN_METADATA_KEY
from cluster.state import ClusterView
from engine.config import EngineConfig, EngineRole
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer import TransferError, create_transport
from kvtransfer.descriptor import NodeDescriptor
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import cluster_pb2_grpc, inference_pb2_grpc
from splitserve.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(240)
API_KEY = "sk-test-the-router-key"
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=1, decode=1, colocated=1, api_key=API_KEY, grpc_port=0, http_port=0,
        node_args=["--kv-cache-mb", "16"],
    )  # fmt: skip
    with LocalCluster(spec) as running:
        yield running


def _code(call: object) -> grpc.StatusCode:
    try:
        result = call() if callable(call) else call
        for _ in result if hasattr(result, "__iter__") else ():  # a stream fails on its first read
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _free_blocks(cluster: LocalCluster, role: str) -> tuple[int, int]:
    with ClusterView(cluster.redis_url) as view:
        assert view.wait_for(lambda: all(n.load for n in view.nodes(role)), 5.0)  # type: ignore[arg-type]
        [node] = view.nodes(role)  # type: ignore[arg-type]
        assert node.load is not None
        return node.load.free_kv_blocks, node.load.total_kv_blocks


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", f"Bearer {API_KEY}"),), ((TOKEN_METADATA_KEY, "a-guessed-token"),)],
    ids=["no-credentials", "api-key-only", "wrong-token"],
)
def test_node_ports_answer_nothing_without_the_cluster_token(
    cluster: LocalCluster, metadata: tuple[tuple[str, str], ...]
) -> None:
    [decode] = cluster.by_role("decode")
    [prefill] = cluster.by_role("prefill")
    [colocated] = cluster.by_role("colocated")
    sampling = pb.SamplingParameters(max_tokens=4, temperature=0.0)
    md = list(metadata)
    with (
        grpc.insecure_channel(decode.address) as to_decode,
        grpc.insecure_channel(prefill.address) as to_prefill,
        grpc.insecure_channel(colocated.address) as to_colocated,
    ):
        decode_stub = cluster_pb2_grpc.DecodeNodeStub(to_decode)
        prefill_stub = cluster_pb2_grpc.PrefillNodeStub(to_prefill)
        attempts = {
            "Reserve": lambda: decode_stub.Reserve(
                cpb.ReserveRequest(
                    request_id="r", prompt_token_ids=PROMPT * 50, sampling=sampling, hold_seconds=60
                ),
                metadata=md,
                timeout=10,
            ),
            "Decode": lambda: decode_stub.Decode(cpb.DecodeRequest(request_id="r"), metadata=md, timeout=10),
            "decode Abort": lambda: decode_stub.Abort(
                cpb.AbortRequest(request_id="r"), metadata=md, timeout=10
            ),
            "Prefill": lambda: prefill_stub.Prefill(
                cpb.PrefillRequest(request_id="p", prompt_token_ids=PROMPT, sampling=sampling),
                metadata=md,
                timeout=10,
            ),
            "prefill Abort": lambda: prefill_stub.Abort(
                cpb.AbortRequest(request_id="p"), metadata=md, timeout=10
            ),
            "colocated Generate": lambda: inference_pb2_grpc.InferenceStub(to_colocated).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling),
                metadata=md,
                timeout=10,
            ),
            "prefill-node Generate": lambda: inference_pb2_grpc.InferenceStub(to_prefill).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling),
                metadata=md,
                timeout=10,
            ),
        }
        codes = {name: _code(attempt) for name, attempt in attempts.items()}
    assert codes == dict.fromkeys(attempts, grpc.StatusCode.UNAUTHENTICATED)
    free, total = _free_blocks(cluster, "decode")
    assert free == total  # the refused Reserve pinned nothing


def test_health_stays_open_for_probes(cluster: LocalCluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for node in (*cluster.by_role("decode"), *cluster.by_role("prefill"), *cluster.by_role("colocated")):
        with grpc.insecure_channel(node.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_redis_refuses_clients_without_the_password(cluster: LocalCluster) -> None:
    assert cluster.redis is not None and cluster.redis.port is not None
    for password in (None, "guessed"):
        client = redis.Redis(host="127.0.0.1", port=cluster.redis.port, password=password, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):  # NOAUTH, or WRONGPASS
            client.set("splitserve:v1:control:decode-0", b'{"drain": true}')
        with pytest.raises(redis.AuthenticationError):
            client.keys("*")
        client.close()
    assert redis.Redis.from_url(cluster.redis_url).ping()  # the URL the cluster holds carries the password


def test_every_listener_binds_the_advertised_host_only(cluster: LocalCluster) -> None:
    for node in (*cluster.by_role("decode"), *cluster.by_role("prefill"), *cluster.by_role("colocated")):
        listening = [
            c.laddr
            for c in psutil.Process(node.popen.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening, node.role
        # gRPC listens on an IPv6 socket bound to the v4-mapped 127.0.0.1: the same single address
        assert {a.ip.removeprefix("::ffff:") for a in listening} == {"127.0.0.1"}, (node.role, listening)
    store = _descriptor(cluster, "decode").endpoint
    decode_listening = {
        f"{c.laddr.ip.removeprefix('::ffff:')}:{c.laddr.port}"
        for c in psutil.Process(cluster.by_role("decode")[0].popen.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert store in decode_listening  # the TCPStore is among them: bound to 127.0.0.1, not 0.0.0.0


def _descriptor(cluster: LocalCluster, role: str) -> NodeDescriptor:
    with ClusterView(cluster.redis_url) as view:
        [node] = view.nodes(role)  # type: ignore[arg-type]
        return NodeDescriptor.from_bytes(node.info.transport)


def test_kv_store_refuses_a_peer_without_the_cluster_token(cluster: LocalCluster, llama_dir: Path) -> None:
    descriptor = _descriptor(cluster, "decode")
    pool = LLMEngine(
        llama_dir, EngineConfig(role=EngineRole.PREFILL, kv_cache_memory_bytes=16 << 20)
    ).kv_layers
    for token in (None, "a-guessed-token"):
        intruder = create_transport("torch", f"intruder-{token is None}", cluster_token=token)
        try:
            intruder.register(pool)
            with pytest.raises(TransferError, match="unauthorized"):
                intruder.connect(descriptor.to_bytes())
        finally:
            intruder.close()
    member = create_transport("torch", "member", cluster_token=cluster.cluster_token)
    try:  # the same connect with the token: the refusals above were the token's doing
        member.register(pool)
        member.connect(descriptor.to_bytes())
    finally:
        member.close()


def test_the_keyed_path_through_the_router_gives_exact_output(cluster: LocalCluster, llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [expected] = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64)).generate([PROMPT], params)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParameters(max_tokens=8, temperature=0.0, ignore_eos=True),
    )
    with grpc.insecure_channel(cluster.router_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        assert _code(lambda: stub.Generate(request, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.Generate(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=60))
    tokens = [t for reply in replies for t in reply.token_ids]
    assert tokens == expected.token_ids


def test_bench_results_hold_no_api_key(cluster: LocalCluster, llama_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "bench", "--endpoint", f"http://{cluster.http_address}/v1",
         "--tokenizer", str(llama_dir), "--num-requests", "2", "--concurrency", "1", "--input-len", "8", "--output-len", "4",
         "--api-key", API_KEY, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for written in tmp_path.iterdir():
        assert API_KEY not in written.read_text(errors="replace"), written.name
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["api_key_set"] is True
    assert API_KEY not in result.stdout + result.stderr
