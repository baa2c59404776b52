"""The router's index of which node holds which prefix-cache blocks, kept from the nodes' KV events.

Nodes mirror their prefix-cache keys into Redis and announce each change (cluster/state/kv_events.py). One daemon
thread per router subscribes to the announcements, then reads each node's set and sequence number in one MULTI, and
applies batches in sequence order; a gap, a reset, or a sequence number in Redis that differs from the one held
(checked every `check_s`, which also catches announcements lost while disconnected) makes it read that node again.
Nodes whose keys expired (dead for KV_TTL_S) leave the index.

Lookups never touch Redis: `cached_blocks(chain)` walks a prompt's key chain (engine/prefix_hash.py) and returns,
per node, how many leading blocks it holds. Bounded: at most `max_keys_per_node` keys per node (a node's pool size
bounds its set anyway; the cap guards against a misbehaving one) and nodes come and go with their sets. The index may
be stale by an interval: that only costs a recompute, since engines look up their own caches at admission.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import redis

from cluster.state.kv_events import (
    KV_EVENTS_CHANNEL,
    decode_key,
    decode_message,
    kv_seq_key,
    kv_set_key,
)
from cluster.state.records import InvalidRecord, connect, follow

logger = logging.getLogger(__name__)

DEFAULT_MAX_KEYS_PER_NODE = 1 << 20  # 16M tokens of prefix at 16-token blocks


class KVIndex:
    def __init__(
        self,
        redis_url: str,
        *,
        check_s: float = 1.0,
        max_keys_per_node: int = DEFAULT_MAX_KEYS_PER_NODE,
    ) -> None:
        self._client = connect(redis_url)
        self._check_s = check_s
        self._max_keys = max_keys_per_node
        self._lock = threading.Lock()  # guards the maps below: written by the thread, read by lookups
        self._keys: dict[str, set[int]] = {}  # node -> keys it offers
        self._holders: dict[int, set[str]] = {}  # key -> nodes offering it
        self._seq: dict[str, int] = {}
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped_keys = 0  # keys refused by the per-node cap

    # -- lookups --

    def cached_blocks(self, chain: Sequence[int]) -> dict[str, int]:
        """Per node holding the first block of chain, how many leading blocks of it the node holds."""
        depth: dict[str, int] = {}
        with self._lock:
            alive: set[str] | None = None
            for i, key in enumerate(chain):
                holders = self._holders.get(key)
                if not holders:
                    break
                alive = set(holders) if alive is None else alive & holders
                if not alive:
                    break
                for node in alive:
                    depth[node] = i + 1
        return depth

    def nodes(self) -> dict[str, int]:
        """Each indexed node's number of keys."""
        with self._lock:
            return {node: len(keys) for node, keys in self._keys.items()}

    # -- life cycle --

    def start(self, timeout_s: float = 5.0) -> bool:
        """Starts the thread; True once the first full read is done within timeout_s (placement works without)."""
        self._thread = threading.Thread(target=self._run, name="splitserve-kv-index", daemon=True)
        self._thread.start()
        return self._synced.wait(timeout_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._client.close()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Polls predicate() every 10 ms until it holds or timeout_s passes (for tests and start-up)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the index thread --

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                self._follow()
            except (redis.RedisError, OSError) as exc:
                if not failing:
                    logger.warning("KV index lost Redis (%s); retrying", exc)
                failing = True
                self._stopping.wait(0.2)

    def _follow(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(KV_EVENTS_CHANNEL)
            follow(pubsub, self._stopping, self._on_message, self._check_all, self._check_s)
        finally:
            pubsub.close()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            message = decode_message(data)
        except InvalidRecord as exc:
            logger.warning("ignoring a KV event: %s", exc)
            return
        held = self._seq.get(message.node_id)
        if held is not None and message.seq <= held and not message.reset:
            return  # already in the set read after it was published
        if message.reset or held is None or message.seq != held + 1:
            self._read_node(message.node_id)
            return
        with self._lock:
            keys = self._keys.setdefault(message.node_id, set())
            for key in message.removed:
                self._unlink(message.node_id, keys, key)
            self._link_all(message.node_id, keys, message.stored)
            self._seq[message.node_id] = message.seq

    def _check_all(self) -> None:
        """Read again every node whose sequence number in Redis differs from ours; drop nodes whose keys expired."""
        prefix = kv_seq_key("")
        names = [name.decode() for name in self._client.scan_iter(match=prefix + "*", count=1000)]
        nodes = [name.removeprefix(prefix) for name in names]
        values = self._client.mget(names) if names else []
        live = {node: int(value) for node, value in zip(nodes, values, strict=True) if value is not None}
        for node in [n for n in self._seq if n not in live]:
            self._forget(node)
        for node, seq in live.items():
            if self._seq.get(node) != seq:
                self._read_node(node)
        self._synced.set()

    def _read_node(self, node: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.get(kv_seq_key(node))
        pipe.smembers(kv_set_key(node))
        seq, members = pipe.execute()
        if seq is None:
            self._forget(node)
            return
        fresh: list[int] = []
        for member in members:
            try:
                fresh.append(decode_key(member))
            except InvalidRecord:
                continue
        with self._lock:
            self._drop_keys(node)
            keys: set[int] = set()
            self._keys[node] = keys
            self._link_all(node, keys, fresh)
            self._seq[node] = int(seq)

    def _forget(self, node: str) -> None:
        with self._lock:
            self._drop_keys(node)
            self._seq.pop(node, None)

    def _drop_keys(self, node: str) -> None:
        for key in self._keys.pop(node, set()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(node)
                if not holders:
                    del self._holders[key]

    def _link_all(self, node: str, keys: set[int], stored: Iterable[int]) -> None:
        for key in stored:
            if key in keys:
                continue
            if len(keys) >= self._max_keys:
                self.dropped_keys += 1
                continue
            keys.add(key)
            self._holders.setdefault(key, set()).add(node)

    def _unlink(self, node: str, keys: set[int], key: int) -> None:
        keys.discard(key)
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(node)
            if not holders:
                del self._holders[key]
