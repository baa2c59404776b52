"""Operator control on a live cluster: drain, resume and move nodes between pools through their Redis control key.

One cluster (embedded Redis, 1 router, 1 prefill node started with --node-id, 2 decode nodes) goes through every
action the ops dashboard can take. Where requests ran is read from the load reports the nodes publish (a node that
runs a request reports it running): each check also shows that the node expected to serve did, so it cannot pass
by seeing nothing. Tokens must equal the single-process engine's every time.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.redis_server import EmbeddedRedis
from cluster.state import (
    CONTROL_TTL_S,
    EVENTS_CHANNEL,
    ClusterView,
    InvalidRecord,
    NodeControl,
    NodeInfo,
    NodeRegistration,
    clear_control,
    connect,
    control_key,
    decode_event,
    read_control,
    write_control,
)
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster, Process
from tests.integration.cluster_client import generate_many

pytestmark = pytest.mark.timeout(240)
MAX_TOKENS = 32
KEPT_ID = "operator-kept-id"  # the prefill node's --node-id: a move must keep it
WAIT_S = 30.0  # bound of every wait for a node's reaction (a move reloads the model)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(5, 80))] for _ in range(n)]


def expected_tokens(model: Path, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in LLMEngine(model, EngineConfig(num_kv_blocks=1024)).generate(batch, params)]


class LoadLog:
    """Every load report published while open: which nodes ran or queued anything."""

    def __init__(self, redis_url: str) -> None:
        self._client = connect(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._busy: dict[str, int] = defaultdict(int)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def busy_reports(self, node_id: str) -> int:
        return self._busy[node_id]

    def __enter__(self) -> LoadLog:
        self._pubsub.subscribe(EVENTS_CHANNEL)
        self._pubsub.get_message(timeout=5.0)  # the subscription's confirmation: reports from now on are seen
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(5.0)
        self._pubsub.close()
        self._client.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            message = self._pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            event = decode_event(message["data"])
            if event.load is not None and (event.load.running_requests or event.load.queued_prompt_tokens):
                self._busy[event.node_id] += 1


class NodeLines:
    """A launched node's stdout events, read as the test needs them (the launcher pumps lines into a queue)."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc

    def next_event(self, name: str) -> dict[str, object]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.proc.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            assert line is not None, (
                f"node {self.proc.node_id} closed its stdout (exit {self.proc.popen.poll()})"
            )
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                return event
        raise AssertionError(f"node {self.proc.node_id} printed no {name!r} event within {WAIT_S:.0f} s")


def samples(metrics_address: object, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples named `name` on a component's Prometheus /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = text_string_to_metric_families(text)
    return [(s.labels, s.value) for family in families for s in family.samples if s.name == name]


def router_sees(cluster: LocalCluster, nodes: dict[str, str]) -> bool:
    """Whether the router's own view lists each node id with its role (its /metrics shows every live node)."""
    seen = {
        (labels["node"], labels["role"])
        for labels, _ in samples(cluster.http_address, "splitserve:node_power_watts")
    }
    return all((node_id, role) in seen for node_id, role in nodes.items())


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_control_record_in_redis_expires_renews_and_leaves_with_the_node() -> None:
    with EmbeddedRedis() as server:
        client = connect(server.url)
        assert read_control(client, "decode-0") is None
        write_control(client, "decode-0", NodeControl(drain=True, requested_at=5.0))
        assert read_control(client, "decode-0") == NodeControl(drain=True, requested_at=5.0)
        assert 0 < client.ttl(control_key("decode-0")) <= CONTROL_TTL_S
        client.expire(control_key("decode-0"), 60)
        assert read_control(client, "decode-0", renew=True) is not None
        assert client.ttl(control_key("decode-0")) > 60  # the node's read renews it
        clear_control(client, "decode-0")
        assert read_control(client, "decode-0") is None

        client.set(control_key("decode-0"), json.dumps({"pool": "gpu"}))  # written by something else
        with pytest.raises(InvalidRecord, match="pool must be one of"):
            read_control(client, "decode-0")
        with pytest.raises(ValueError, match="pool must be one of"):
            write_control(client, "decode-0", NodeControl(pool="gpu"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="bad node_id"):
            write_control(client, "no spaces", NodeControl(drain=True))

        with NodeRegistration(server.url) as registration:
            registration.register(NodeInfo("decode-0", "decode", "127.0.0.1:1", "m", "cpu", 8, 16))
            write_control(client, "decode-0", NodeControl(drain=True, requested_at=7.0))
            assert registration.read_control() == NodeControl(drain=True, requested_at=7.0)
            registration.deregister()
        assert (
            client.get(control_key("decode-0")) is None
        )  # no control left for the next process under this id
        client.close()


def test_drain_resume_and_move_between_pools_on_a_live_cluster(llama_dir: Path) -> None:
    batch = prompts(6, seed=23)
    expected = expected_tokens(llama_dir, batch)
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=2, grpc_port=0, http_port=0,
                       role_args={"prefill": ["--node-id", KEPT_ID]})  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        client = connect(cluster.redis_url)
        prefill, d1, d2 = cluster.by_role("prefill")[0], *cluster.by_role("decode")
        lines = {p.node_id: NodeLines(p) for p in (prefill, d1, d2)}

        def draining(node_id: str) -> bool:
            state = view.get(node_id)
            return state is not None and state.load is not None and state.load.draining

        def serve_batch() -> LoadLog:
            with LoadLog(cluster.redis_url) as log:
                results = generate_many(cluster.router_address, batch, **sampling)
            assert [r.token_ids for r in results] == expected
            return log

        # drain one decode node: the router's view marks it, and every request goes to the other one
        write_control(client, d1.node_id, NodeControl(drain=True))
        assert lines[d1.node_id].next_event("draining") == {"event": "draining", "node_id": d1.node_id}
        assert view.wait_for(lambda: draining(d1.node_id), timeout_s=WAIT_S)
        log = serve_batch()
        assert log.busy_reports(d1.node_id) == 0 and log.busy_reports(d2.node_id) > 0

        # resume it and drain the other: now it serves everything
        write_control(client, d1.node_id, NodeControl(drain=False))
        write_control(client, d2.node_id, NodeControl(drain=True))
        lines[d1.node_id].next_event("resumed")
        lines[d2.node_id].next_event("draining")
        assert view.wait_for(lambda: not draining(d1.node_id) and draining(d2.node_id), timeout_s=WAIT_S)
        log = serve_batch()
        assert log.busy_reports(d1.node_id) > 0 and log.busy_reports(d2.node_id) == 0
        clear_control(client, d2.node_id)  # no control at all: serve
        lines[d2.node_id].next_event("resumed")

        # move a decode node (fresh id) to the prefill pool and the prefill node (--node-id) to the decode pool
        write_control(client, d2.node_id, NodeControl(pool="prefill"))
        write_control(client, prefill.node_id, NodeControl(pool="decode"))
        moved: dict[str, str] = {}
        moved_metrics: dict[str, object] = {}
        for old, proc, role in ((d2.node_id, d2, "prefill"), (prefill.node_id, prefill, "decode")):
            moving = lines[old].next_event("moving")
            assert moving == {"event": "moving", "node_id": old, "to": role, "drained": True}
            ready = lines[old].next_event("ready")
            assert ready["role"] == role and proc.popen.poll() is None  # the same process, never exited
            moved[role], moved_metrics[role] = str(ready["node_id"]), ready["metrics_address"]
        assert moved["decode"] == KEPT_ID
        assert moved["prefill"].startswith("prefill-") and moved["prefill"] != d2.node_id
        assert view.wait_for(lambda: view.get(d2.node_id) is None, timeout_s=WAIT_S)
        assert client.get(control_key(KEPT_ID)) is None  # the old process's move order left with it

        def registered_as(node_id: str, role: str) -> bool:
            state = view.get(node_id)
            return state is not None and state.info.role == role

        assert view.wait_for(lambda: all(registered_as(n, r) for r, n in moved.items()), timeout_s=WAIT_S)
        wait_until(lambda: router_sees(cluster, {moved["prefill"]: "prefill", moved["decode"]: "decode"}),
                   "the router sees both moved nodes in their new pools")  # fmt: skip

        # with the untouched decode node drained, only the two moved nodes can serve a request
        write_control(client, d1.node_id, NodeControl(drain=True))
        lines[d1.node_id].next_event("draining")
        assert view.wait_for(lambda: draining(d1.node_id), timeout_s=WAIT_S)
        log = serve_batch()
        assert log.busy_reports(moved["decode"]) > 0 and log.busy_reports(d1.node_id) == 0
        transfers = samples(moved_metrics["prefill"], "splitserve:kv_transfer_seconds_count")
        assert [(labels["node"], count) for labels, count in transfers] == [(moved["prefill"], len(batch))]
        client.close()
    # SIGTERM still stops every node cleanly: the drained one and the two re-executed ones too
    assert [p.popen.returncode for p in (prefill, d1, d2)] == [0, 0, 0]
