"""The router's liveness bound (router/liveness.py) against a real cluster view: a wait on a node ends soon after
the node's lease lapses (a paused or killed node), and only waits on nodes the attempt still uses are cut short."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cluster.redis_server import EmbeddedRedis
from cluster.state import ClusterView, NodeInfo, NodeRegistration
from router.liveness import NodeLost, NodeWatch

TTL_S = 0.5


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as redis:
        yield redis.url


@pytest.fixture
def view(redis_url: str) -> Iterator[ClusterView]:
    with ClusterView(redis_url) as started:
        yield started


def _info(node_id: str, role: str) -> NodeInfo:
    return NodeInfo(node_id, role, "127.0.0.1:1", "tiny", "cpu-2c", 64, 16, b"descriptor")  # type: ignore[arg-type]


def _registered(redis_url: str, view: ClusterView, node_id: str, role: str) -> NodeRegistration:
    node = NodeRegistration(redis_url, ttl_s=TTL_S)
    node.register(_info(node_id, role))
    assert view.wait_for(lambda: view.get(node_id) is not None, 2.0)
    return node


async def _wait_forever() -> None:
    await asyncio.Event().wait()


def test_a_wait_ends_soon_after_the_node_stops_renewing_its_lease(redis_url: str, view: ClusterView) -> None:
    node = _registered(redis_url, view, "decode-hung", "decode")
    state = view.get("decode-hung")
    assert state is not None

    async def main() -> tuple[NodeLost, float]:
        watch = NodeWatch(view)
        started = time.monotonic()
        with watch.watch(state) as live, pytest.raises(NodeLost) as lost:
            async with live.bounded("decode-hung", "Decode", None):
                await _wait_forever()  # the node never answers, and no heartbeat renews its lease
        return lost.value, time.monotonic() - started

    try:
        lost, seconds = asyncio.run(main())
    finally:
        node.close()
    assert lost.node_id == "decode-hung" and "left the cluster" in str(lost)
    assert seconds < TTL_S + 1.5  # the lease, the grace, the view's expiry notice and one watch interval


def test_a_bounded_wait_times_out_and_a_released_node_no_longer_matters(
    redis_url: str, view: ClusterView
) -> None:
    prefill = _registered(redis_url, view, "prefill-done", "prefill")
    decode = _registered(redis_url, view, "decode-alive", "decode")
    states = [view.get("prefill-done"), view.get("decode-alive")]
    assert all(states)

    async def main() -> tuple[str, bool]:
        watch = NodeWatch(view)
        with watch.watch(*states) as live:  # type: ignore[arg-type]
            with pytest.raises(NodeLost) as late:
                async with live.bounded("decode-alive", "Reserve", 0.2):
                    await _wait_forever()
            live.release("prefill-done")  # its part is over: its lease may lapse now
            prefill.close()
            for _ in range(15):  # past the TTL: the prefill node's lease lapses, the decode node's is renewed
                decode.heartbeat()
                await asyncio.sleep(0.1)
            assert view.get("prefill-done") is None
            async with live.bounded("decode-alive", "Decode", 1.0):
                await asyncio.sleep(0.01)  # an answer in time, from a node still in the view
            return str(late.value), live.lost is None

    try:
        late, untouched = asyncio.run(main())
    finally:
        decode.close()
    assert "gave no answer within 0.2 s" in late
    assert untouched
