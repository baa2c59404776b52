"""KV events through a real Redis: nodes' prefix-cache keys reach routers' indexes, across gaps, restarts and churn.

A node's engine records the keys its block manager starts and stops offering (engine/kv_events.py); its publisher
mirrors them into Redis (cluster/state/kv_events.py); a router's KVIndex follows them (router/kv_index.py). The
publishers are flushed by hand here (interval_s is long), so each step of a test is one batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cluster.redis_server import EmbeddedRedis
from cluster.state.kv_events import (
    KV_EVENTS_CHANNEL,
    KVEventMessage,
    KVEventPublisher,
    encode_message,
    kv_set_key,
)
from engine.kv_events import KVEventLog
from engine.prefix_hash import chain
from router.kv_index import KVIndex

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as embedded:
        yield embedded


@pytest.fixture
def url(server: EmbeddedRedis) -> str:
    redis.Redis.from_url(server.url).flushdb()
    return server.url


@pytest.fixture
def index(url: str) -> Iterator[KVIndex]:
    started = KVIndex(url, check_s=0.2)
    assert started.start(5.0)
    yield started
    started.stop()


def publisher(url: str, node_id: str, log: KVEventLog) -> KVEventPublisher:
    return KVEventPublisher(url, node_id, log, interval_s=3600)  # flushed by the test, never by its thread


def holds(index: KVIndex, node: str, keys: list[int]) -> bool:
    return index.cached_blocks(keys).get(node, 0) == len(keys)


def test_stored_and_removed_keys_reach_the_index_and_longest_prefixes_per_node(
    url: str, index: KVIndex
) -> None:
    conversation = list(range(100, 164))  # 4 blocks of 16
    keys = list(chain(conversation, 16))
    log_a, log_b = KVEventLog(), KVEventLog()
    a, b = publisher(url, "node-a", log_a), publisher(url, "node-b", log_b)
    try:
        a.flush(), b.flush()  # first flush: a reset of each (empty) set
        for key in keys:
            log_a.stored(key)
        for key in keys[:2]:
            log_b.stored(key)
        a.flush(), b.flush()
        assert index.wait_for(lambda: index.cached_blocks(keys) == {"node-a": 4, "node-b": 2}, 5.0)
        # A node that lost a middle block holds only the prefix before it.
        log_a.removed(keys[1])
        a.flush()
        assert index.wait_for(lambda: index.cached_blocks(keys) == {"node-a": 1, "node-b": 2}, 5.0)
        assert index.cached_blocks(list(chain([1] * 32, 16))) == {}
    finally:
        a.stop(), b.stop()
    # A stopped publisher removes its node's set; the periodic check drops the node from the index.
    assert index.wait_for(lambda: index.nodes() == {}, 5.0)


def test_a_missed_batch_is_repaired_from_the_set_in_redis(url: str, index: KVIndex) -> None:
    keys = list(chain(list(range(48)), 16))
    log = KVEventLog()
    node = publisher(url, "node-a", log)
    try:
        node.flush()
        log.stored(keys[0])
        node.flush()
        assert index.wait_for(lambda: holds(index, "node-a", keys[:1]), 5.0)
        # Batch 3 changes Redis without its announcement (as if the router's subscription dropped it) ...
        client = redis.Redis.from_url(url)
        client.sadd(kv_set_key("node-a"), keys[1].to_bytes(8, "little"))
        client.set("splitserve:v1:kvseq:node-a", 3)
        node._seq = 3
        # ... and batch 4 arrives: out of sequence, so the index reads the node's whole set again.
        log.stored(keys[2])
        node.flush()
        assert index.wait_for(lambda: holds(index, "node-a", keys), 5.0)
    finally:
        node.stop()


def test_a_restarted_redis_gets_the_whole_set_again(server: EmbeddedRedis, url: str) -> None:
    keys = list(chain(list(range(64)), 16))
    log = KVEventLog()
    node = publisher(url, "node-a", log)
    try:
        node.flush()
        for key in keys:
            log.stored(key)
        node.flush()
        server.restart()  # empty now
        log.removed(keys[3])
        # SET kvseq n GET finds nothing (or the old connection fails first): either way the publisher rewrites
        # the whole set from the engine's snapshot.
        for _ in range(3):
            try:
                node.flush()
                break
            except redis.RedisError:
                continue
        assert redis.Redis.from_url(url).scard(kv_set_key("node-a")) == 3
        index = KVIndex(url, check_s=0.2)
        try:
            assert index.start(5.0)
            assert index.wait_for(lambda: index.cached_blocks(keys) == {"node-a": 3}, 5.0)
        finally:
            index.stop()
    finally:
        node.stop()


def test_the_index_is_bounded_per_node_and_ignores_malformed_events(url: str) -> None:
    index = KVIndex(url, check_s=0.2, max_keys_per_node=3)
    log = KVEventLog()
    node = publisher(url, "node-a", log)
    try:
        assert index.start(5.0)
        node.flush()
        redis.Redis.from_url(url).publish(KV_EVENTS_CHANNEL, b"{not json")
        redis.Redis.from_url(url).publish(KV_EVENTS_CHANNEL, encode_message(KVEventMessage("x", 1, [], [])))
        for key in range(10):
            log.stored(key + 1)
        node.flush()
        assert index.wait_for(lambda: index.nodes().get("node-a") == 3, 5.0)
        assert index.dropped_keys >= 7
    finally:
        node.stop()
        index.stop()
