"""Cluster state against a real redis-server on 127.0.0.1: what a router's view sees as nodes come, report and go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cluster.redis_server import EmbeddedRedis, ensure_redis
from cluster.state import (
    INDEX_KEY,
    ClusterStateUnavailable,
    ClusterView,
    LoadPublisher,
    LoadReport,
    NodeInfo,
    NodeRegistration,
    NotRegistered,
    node_key,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as embedded:
        yield embedded


@pytest.fixture(scope="module")
def quiet_server() -> Iterator[EmbeddedRedis]:
    """No expired-key events, like many managed Redis services: expiry is found by resync alone."""
    with EmbeddedRedis(keyspace_events="") as embedded:
        yield embedded


@pytest.fixture
def url(server: EmbeddedRedis) -> str:
    redis.Redis.from_url(server.url).flushdb()
    return server.url


@pytest.fixture
def view(url: str) -> Iterator[ClusterView]:
    with ClusterView(url) as started:
        yield started


def make_info(node_id: str, role: str = "decode", **changes: object) -> NodeInfo:
    fields: dict[str, object] = dict(
        node_id=node_id,
        role=role,
        address="127.0.0.1:50051",
        model="tiny",
        machine_type="cpu-2c",
        kv_capacity_blocks=64,
        block_size=16,
        transport=b"\x00descriptor\xff",
    )
    fields.update(changes)
    return NodeInfo(**fields)  # type: ignore[arg-type]


def load(node_id: str, free: int = 64) -> LoadReport:
    return LoadReport(
        node_id, queued_prompt_tokens=0, running_requests=0, free_kv_blocks=free, total_kv_blocks=64
    )


def free_blocks(view: ClusterView, node_id: str) -> int | None:
    state = view.get(node_id)
    return None if state is None or state.load is None else state.load.free_kv_blocks


def ids(view: ClusterView, role: str | None = None) -> set[str]:
    return {state.info.node_id for state in view.nodes(role)}  # type: ignore[arg-type]


def elapsed_until(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition()` holds, polled every 5 ms; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic() - start


def test_register_then_deregister_is_seen_by_the_view(url: str, view: ClusterView) -> None:
    info = make_info("decode-0")
    with NodeRegistration(url) as node:
        node.register(info)
        elapsed_until(lambda: view.get("decode-0") is not None, 1.0)
        state = view.get("decode-0")
        assert state is not None and state.info == info and state.load is None
        assert ids(view, "decode") == {"decode-0"} and ids(view, "prefill") == set()
        node.deregister()
        assert elapsed_until(lambda: view.get("decode-0") is None, 1.0) < 0.2
        node.deregister()  # idempotent
    with pytest.raises(NotRegistered):
        node.heartbeat()


def test_a_node_registers_as_one_id_only(url: str) -> None:
    with NodeRegistration(url) as node:
        node.register(make_info("decode-0"))
        with pytest.raises(ValueError, match="already registered as 'decode-0'"):
            node.register(make_info("decode-1"))
        with pytest.raises(ValueError, match="load report of 'decode-1'"):
            node.publish_load(load("decode-1"))


def test_load_reports_reach_the_view_within_200ms(url: str, view: ClusterView) -> None:
    with NodeRegistration(url) as node:
        node.register(make_info("decode-0"))
        for free in (60, 50, 40):
            node.publish_load(load("decode-0", free))
            assert elapsed_until(lambda f=free: free_blocks(view, "decode-0") == f, 1.0) < 0.2  # type: ignore[misc]


def test_load_publisher_keeps_the_lease_and_sends_changes(url: str, view: ClusterView) -> None:
    free = [64]
    with NodeRegistration(url, ttl_s=0.5) as node:
        node.register(make_info("prefill-0", "prefill"))
        with LoadPublisher(node, lambda: load("prefill-0", free[0])):
            elapsed_until(lambda: free_blocks(view, "prefill-0") == 64, 1.0)
            time.sleep(1.2)  # more than twice the TTL: only heartbeats keep the node
            assert ids(view, "prefill") == {"prefill-0"}
            free[0] = 10  # no notify(): the publisher's poll finds the change
            assert elapsed_until(lambda: free_blocks(view, "prefill-0") == 10, 1.0) < 0.2
        # Stopped without deregistering, as if the process hung: the lease runs out.
        elapsed_until(lambda: view.get("prefill-0") is None, 0.5 + 0.5 + 0.3)


def test_an_expired_node_leaves_the_index(url: str, view: ClusterView) -> None:
    client = redis.Redis.from_url(url)
    with NodeRegistration(url, ttl_s=0.2) as node:
        node.register(make_info("decode-0"))
        elapsed_until(lambda: view.get("decode-0") is not None, 1.0)
        elapsed_until(lambda: view.get("decode-0") is None, 1.0)
        elapsed_until(lambda: not client.hexists(INDEX_KEY, "decode-0"), 1.0)
        assert node.heartbeat() is False  # the lease had lapsed: registered again
        assert client.hexists(INDEX_KEY, "decode-0")
        elapsed_until(lambda: view.get("decode-0") is not None, 1.0)


NODE_PROCESS = textwrap.dedent(
    """
    import sys, time
    from cluster.state import LoadPublisher, LoadReport, NodeInfo, NodeRegistration
    node = NodeRegistration(sys.argv[1])
    node.register(NodeInfo("decode-9", "decode", "127.0.0.1:50099", "tiny", "cpu-2c", 64, 16))
    LoadPublisher(node, lambda: LoadReport("decode-9", 0, 0, 64, 64)).start()
    print("registered", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("expiry_events", [True, False], ids=["expiry-events", "resync-only"])
def test_a_killed_node_leaves_two_views_within_3s(
    server: EmbeddedRedis, quiet_server: EmbeddedRedis, expiry_events: bool
) -> None:
    url = server.url if expiry_events else quiet_server.url
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE_PROCESS, url], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "registered"
        with ClusterView(url) as first, ClusterView(url) as second:
            for view in (first, second):
                elapsed_until(lambda v=view: v.get("decode-9") is not None, 2.0)  # type: ignore[misc]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
            killed = time.monotonic()
            elapsed_until(lambda: first.get("decode-9") is None and second.get("decode-9") is None, 3.0)
            assert time.monotonic() - killed < 3.0
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_two_views_see_the_same_nodes(url: str) -> None:
    roles = {"prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode", "both-0": "colocated"}
    nodes = [NodeRegistration(url) for _ in roles]
    with ClusterView(url) as early:
        for node, (node_id, role) in zip(nodes, roles.items(), strict=True):
            node.register(make_info(node_id, role))
            node.publish_load(load(node_id))
        with ClusterView(url) as late:  # joins after the events: sees them by its first resync
            for view in (early, late):
                elapsed_until(lambda v=view: ids(v) == set(roles), 1.0)  # type: ignore[misc]
                assert ids(view, "prefill") == {"prefill-0", "prefill-1"} and ids(view, "colocated") == {
                    "both-0"
                }
            assert set(early.nodes()) == set(late.nodes())
    for node in nodes:
        node.deregister()
        node.close()


def test_malformed_records_and_events_are_skipped(url: str, view: ClusterView) -> None:
    client = redis.Redis.from_url(url)
    client.set(node_key("broken-0"), b"{not json", px=5000)
    client.hset(INDEX_KEY, "broken-0", "g1")
    client.publish("splitserve:v1:events", b'{"kind": "register"}')
    with NodeRegistration(url) as node:
        node.register(make_info("decode-0"))
        elapsed_until(lambda: ids(view) == {"decode-0"}, 1.0)
        time.sleep(0.6)  # a resync passes over the broken record
        assert ids(view) == {"decode-0"}


def test_external_url_is_used_as_is_with_its_database(quiet_server: EmbeddedRedis) -> None:
    external = quiet_server.url.removesuffix("/0") + "/3"
    with ensure_redis(external) as url:
        assert url == external
        with ClusterView(url) as view, NodeRegistration(url) as node:
            node.register(make_info("decode-0"))
            elapsed_until(lambda: view.get("decode-0") is not None, 1.0)
            assert redis.Redis.from_url(external).exists(node_key("decode-0"))
            assert not redis.Redis.from_url(quiet_server.url).exists(node_key("decode-0"))


def test_view_and_nodes_ride_out_a_redis_restart() -> None:
    first = EmbeddedRedis().start()
    url = first.url
    port = int(url.removesuffix("/0").rsplit(":", 1)[1])
    try:
        with ClusterView(url) as view, NodeRegistration(url) as node:
            node.register(make_info("decode-0"))
            with LoadPublisher(node, lambda: load("decode-0")):
                elapsed_until(lambda: view.get("decode-0") is not None, 1.0)
                first.stop()
                # empty: the node must register again by itself
                with EmbeddedRedis(port=port, password=first.password):
                    client = redis.Redis.from_url(url)
                    elapsed_until(lambda: client.exists(node_key("decode-0")) == 1, 3.0)
                    elapsed_until(lambda: view.sync_age_s() < 0.6 and view.get("decode-0") is not None, 3.0)
    finally:
        first.stop()


def test_view_start_fails_fast_without_redis() -> None:
    with EmbeddedRedis() as gone:
        url = gone.url
    started = time.monotonic()
    with pytest.raises(ClusterStateUnavailable, match=r"gave no cluster state within 1\.0 s"):
        ClusterView(url, timeout_s=0.2).start(timeout_s=1.0)
    assert time.monotonic() - started < 3.0


def test_embedded_redis_stops_its_process() -> None:
    server = EmbeddedRedis().start()
    pid = server.pid
    assert pid is not None and redis.Redis.from_url(server.url).ping()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
