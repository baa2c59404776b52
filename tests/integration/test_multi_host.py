"""A split cluster spread over hosts: every node in a network namespace of its own, on a private address, joined by
a bridge (tests/integration/netns_hosts.py); the router in another; Redis on the bridge. Nodes bind and advertise
those addresses (one listens on 0.0.0.0 and advertises its own), and KV crosses the veths, for both transports.

UCX_TLS=tcp,self for NIXL: the namespaces share one kernel, and UCX would otherwise move KV through shared memory, as
between processes of one host; on separate hosts that path does not exist.

Needs root (skipped otherwise, with the reason). The model has wide KV (8 KiB a token) so that a 1 Gbit/s link
costs about as much time as the prompt's compute on this CPU.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tiny_model import make_tiny_model
from ops.launcher import ClusterSpec, LocalCluster, Placement
from tests.integration.cluster_client import backend_available, generate, generate_many, recent_requests
from tests.integration.netns_hosts import NetnsHosts, unavailable_reason

pytestmark = pytest.mark.timeout(900)
BACKENDS = ["torch", "nixl"]
HOSTS = ["router", "p0", "p1", "d0", "d1"]
PREFILL, DECODE = ["p0", "p1"], ["d0", "d1"]
ONE_PIECE_BELOW = 64  # prompts from 64 tokens stream layer by layer
KV_TIMEOUT_S = 5.0  # a write stuck this long fails (the default, 30 s, would make the fault test slow)


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsHosts(HOSTS) as made:
        yield made


@pytest.fixture(scope="module")
def wide_kv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide-kv")
    return make_tiny_model(root / "llama", arch="llama", layers=4, hidden=256, heads=8, kv_heads=8, seed=11)


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, hosts: NetnsHosts, wide_kv_model: Path) -> Iterator[LocalCluster]:
    if not backend_available(request.param):
        pytest.skip(f"the {request.param} KV backend is not installed")

    def place(role: str, index: int) -> Placement:
        if role == "router":
            return hosts.placement("router")
        name = ("p" if role == "prefill" else "d") + str(index)
        return hosts.placement(name, advertise_only=name == "d1")

    spec = ClusterSpec(
        model_dir=wide_kv_model,
        prefill=2,
        decode=2,
        grpc_port=0,
        http_port=0,
        kv_backend=request.param,
        place=place,
        redis_host=hosts.bridge_address,
        node_args=[
            "--kv-cache-mb", "64", "--max-batched-tokens", "512", "--one-piece-below", str(ONE_PIECE_BELOW),
            "--kv-transfer-timeout-s", str(KV_TIMEOUT_S),
        ],
    )  # fmt: skip
    saved = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = "tcp,self"
    try:
        with LocalCluster(spec) as running:
            yield running
    finally:
        for name in HOSTS:
            hosts.unshape(name)
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved


def fresh_prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts no cache holds (a decode node's prefix cache would hide their transfer)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def single_engine(model: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024))
    try:
        return [out.token_ids for out in engine.generate(prompts, params)]
    finally:
        engine.close()


def test_32_streams_across_hosts_equal_a_single_engine(
    cluster: LocalCluster, hosts: NetnsHosts, wide_kv_model: Path
) -> None:
    prompts = fresh_prompts(32, [5, 16, 40, 63, 64, 120, 300, 700], seed=1)
    expected = single_engine(wide_kv_model, prompts, max_tokens=8)
    received_before = sum(hosts.received_bytes(d) for d in DECODE)
    results = generate_many(cluster.router_address, prompts, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in results] == expected
    records = recent_requests(cluster, len(prompts))
    assert all(r["outcome"] == "ok" for r in records), records
    kv_bytes = sum(r["transfer_bytes"] for r in records)
    received = sum(hosts.received_bytes(d) for d in DECODE) - received_before
    assert kv_bytes > 0 and received >= kv_bytes, (
        f"the decode hosts received {received} bytes for {kv_bytes} bytes of KV: it went another way"
    )
    with ClusterView(cluster.redis_url) as view:
        assert view.wait_for(lambda: len(view.nodes()) == 4, timeout_s=10.0)
        registered = {state.info.address.rsplit(":", 1)[0] for state in view.nodes()}
    assert registered == {hosts.address(n) for n in PREFILL + DECODE}


def test_nodes_listen_on_their_own_address_only(cluster: LocalCluster, hosts: NetnsHosts) -> None:
    """Every listening socket of a node is on its host's address; d1 (--host 0.0.0.0) serves gRPC and metrics on
    every interface, as asked, and its KV transport on the advertised address only."""
    nodes = {p.node_id: p for p in cluster.processes if p.role != "router"}
    by_host = {
        n: next(p for p in nodes.values() if p.address.startswith(hosts.address(n) + ":"))
        for n in PREFILL + DECODE
    }
    for name, proc in by_host.items():
        sockets = [(a, port) for a, port, pid in hosts.listening(name) if pid == proc.popen.pid]
        assert sockets, f"no listening socket of {name}'s node found"
        wildcard_ok = {int(proc.address.rsplit(":", 1)[1]), int(proc.metrics_address.rsplit(":", 1)[1])}
        for address, port in sockets:
            if name == "d1" and port in wildcard_ok:
                assert address in ("0.0.0.0", "*"), (name, address, port)
            else:
                assert address == hosts.address(name), f"{name} listens on {address}:{port}"


def test_a_1_gbit_link_still_overlaps_the_transfer(
    cluster: LocalCluster, hosts: NetnsHosts, wide_kv_model: Path
) -> None:
    """P->D links shaped to 1 Gbit/s: long prompts still return the single engine's tokens, their KV goes through
    the shaped class, and the wait after the compute (the transfer not hidden behind it) is printed beside the
    unshaped one. Alternating rounds, one prompt at a time."""
    rounds = 3
    prompts = fresh_prompts(2 * rounds, [1500], seed=2)
    expected = single_engine(wide_kv_model, prompts, max_tokens=2)
    figures: dict[str, list[dict]] = {"unshaped": [], "1gbit": []}
    for i, prompt in enumerate(prompts):
        shaped = i % 2 == 1
        for p in PREFILL:
            if shaped:
                hosts.shape(p, "1gbit", DECODE)
            else:
                hosts.unshape(p)
        sent_before = sum(hosts.sent_bytes(p) for p in PREFILL)
        result = asyncio.run(
            generate(cluster.router_address, prompt, max_tokens=2, temperature=0.0, ignore_eos=True)
        )
        assert result.token_ids == expected[i]
        record = recent_requests(cluster, 1)[0]
        if shaped:
            through_class = sum(hosts.sent_bytes(p) for p in PREFILL) - sent_before
            assert through_class >= record["transfer_bytes"] > 0, (through_class, record["transfer_bytes"])
        figures["1gbit" if shaped else "unshaped"].append(record)
    for p in PREFILL:
        hosts.unshape(p)
    print()
    for label, records in figures.items():
        ttft = statistics.median(r["ttft_s"] for r in records) * 1e3
        compute = statistics.median(r["phases"]["prefill"] for r in records) * 1e3
        wait = statistics.median(r["phases"]["transfer"] for r in records) * 1e3
        whole = statistics.median(r["transfer_seconds"] for r in records) * 1e3
        mb = statistics.median(r["transfer_bytes"] for r in records) / 1e6
        print(
            f"[{cluster.spec.kv_backend}] {label:>8}: 1500-token prompts, {mb:.1f} MB of KV: TTFT {ttft:.0f} ms, "
            f"compute {compute:.0f} ms, whole transfer {whole:.0f} ms, wait after compute {wait:.1f} ms"
        )


@pytest.mark.parametrize("fault", ["partition", "link-down"])
def test_cutting_a_prefill_node_off_mid_transfer_fails_no_request(
    cluster: LocalCluster, hosts: NetnsHosts, wide_kv_model: Path, fault: str
) -> None:
    """P->D links slowed to 40 Mbit/s (so transfers last seconds), four long prompts in flight; once KV is moving, the prefill
    node sending the most is cut off from the decode nodes: `partition` cuts its links to them only (Redis and the
    router still reach it, so it stays in the cluster), `link-down` takes its host's link down (it leaves the
    cluster). Restored after twice the transfer timeout. Every request returns the single engine's tokens."""
    prompts = fresh_prompts(4, [1200, 900], seed=3 if fault == "partition" else 4)
    expected = single_engine(wide_kv_model, prompts, max_tokens=4)
    for p in PREFILL:  # a prompt's KV takes ~2 s: caught midway, and two prompts' writes still land in time
        hosts.shape(p, "40mbit", DECODE)
    victim: str | None = None

    def cut(name: str) -> None:
        if fault == "partition":
            for d in DECODE:
                hosts.partition(name, d)
        else:
            hosts.cut(name)

    def restore(name: str) -> None:
        if fault == "partition":
            for d in DECODE:
                hosts.heal(name, d)
        else:
            hosts.restore(name)

    async def run() -> list[list[int]]:
        nonlocal victim
        sampling = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
        tasks = [asyncio.create_task(generate(cluster.router_address, p, **sampling)) for p in prompts]
        deadline = time.monotonic() + 60.0
        while victim is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            sent = {p: hosts.sent_bytes(p) for p in PREFILL}
            busiest = max(sent, key=lambda p: sent[p])
            if sent[busiest] > 256 * 1024:
                victim = busiest
                cut(victim)
                for p in PREFILL:  # the slow links only served to catch a transfer midway
                    if p != victim:
                        hosts.unshape(p)
        assert victim is not None, "no KV started moving"
        await asyncio.sleep(2 * KV_TIMEOUT_S)
        restore(victim)
        return [(await t).token_ids for t in tasks]

    try:
        assert asyncio.run(run()) == expected
    finally:
        if victim is not None:
            restore(victim)
        for p in PREFILL:
            hosts.unshape(p)
    records = recent_requests(cluster, len(prompts))
    assert all(r["outcome"] == "ok" for r in records), records
    retried = [r for r in records if r["retries"]]
    assert retried, "no request met the cut"
    if fault == "partition":  # the router blamed the links, not the decode nodes, and counted them
        link_retries = sum("its decode peer failed" in why for r in retried for why in r["retries"])
        with urllib.request.urlopen(f"http://{cluster.http_address}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        counted = re.search(r'^splitserve:retries_total\{blamed="link"\} (\S+)$', metrics, re.MULTILINE)
        assert counted is not None and float(counted.group(1)) >= link_retries > 0, metrics
    with ClusterView(cluster.redis_url) as view:  # the cut node is back for whatever runs next
        assert view.wait_for(lambda: len(view.nodes()) == 4, timeout_s=30.0), "the cut node did not come back"
    print(f"\n[{cluster.spec.kv_backend}] {fault} of {victim}: retries {[r['retries'] for r in retried]}")
