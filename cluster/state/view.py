"""Router side of cluster state: an in-memory view of the live nodes, kept by one daemon thread."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import redis

from cluster.state.records import (
    DEFAULT_RESYNC_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TTL_S,
    EVENTS_CHANNEL,
    INDEX_KEY,
    KEY_PREFIX,
    ClusterStateUnavailable,
    InvalidRecord,
    LoadReport,
    NodeState,
    Role,
    T,
    connect,
    decode_event,
    decode_load,
    decode_node,
    follow,
    node_key,
)

logger = logging.getLogger(__name__)

# How long a view keeps the nodes it knew once Redis is back after an outage, though Redis lacks them: a live node
# registers again at its next heartbeat (TTL/4, or its retry back-off of at most 1 s), well within one lease.
REJOIN_GRACE_S = DEFAULT_TTL_S


# Every registered node whose key exists: flat (id, generation, load JSON or nil) triples. Index entries of nodes
# whose key expired are dropped in the same atomic step, so a node re-registering cannot lose its entry to a race.
_SNAPSHOT_LUA = """
local index = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #index, 2 do
  local id = index[i]
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. id) == 1 then
    out[#out + 1] = id
    out[#out + 1] = index[i + 1]
    out[#out + 1] = redis.call('GET', ARGV[1] .. 'load:' .. id)
  else
    redis.call('HDEL', KEYS[1], id)
  end
end
return out
"""


class ClusterView:
    """A router's in-memory copy of the live nodes, kept by a daemon thread; reads never touch Redis.

    Started once, stopped once (or used as a context manager):
        view = ClusterView(url)
        view.start()  # returns after the first full sync, or raises ClusterStateUnavailable
        decode_nodes = view.nodes("decode")
        view.stop()
    """

    def __init__(
        self,
        redis_url: str,
        *,
        resync_s: float = DEFAULT_RESYNC_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        rejoin_grace_s: float = REJOIN_GRACE_S,
    ) -> None:
        if not 0.01 <= resync_s <= 60:
            raise ValueError(f"resync_s must be within [0.01, 60], not {resync_s}")
        self._url = redis_url
        self._resync_s = resync_s
        self._client = connect(redis_url, timeout_s=timeout_s)
        self._snapshot = self._client.register_script(_SNAPSHOT_LUA)
        db = self._client.get_connection_kwargs().get("db", 0)
        self._expired_channel = f"__keyevent@{db}__:expired".encode()
        # Written by the view thread only, under _lock; `nodes()` reads cached tuples without taking it.
        self._lock = threading.Lock()
        self._states: dict[str, NodeState] = {}
        self._cache: dict[Role | None, tuple[NodeState, ...]] = {}
        self._changed = threading.Condition()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced_at = float("-inf")
        self._rejoin_grace_s = rejoin_grace_s
        # After an outage, until this monotonic time, nodes known before it stay although Redis lacks them (a
        # restarted Redis is empty until the nodes' next heartbeats register them again).
        self._keep_known_until = float("-inf")
        self._in_outage = False
        self._unconfirmed: frozenset[str] = frozenset()
        self._last_error: Exception | None = None
        self._warned: set[str] = set()

    # -- reads: the hot path --

    def nodes(self, role: Role | None = None) -> tuple[NodeState, ...]:
        """The live nodes (of one role, or all), from memory."""
        cached = self._cache.get(role)
        if cached is not None:
            return cached
        with self._lock:
            result = tuple(s for s in self._states.values() if role is None or s.info.role == role)
            self._cache[role] = result
        return result

    def get(self, node_id: str) -> NodeState | None:
        return self._states.get(node_id)

    def unconfirmed(self) -> frozenset[str]:
        """Ids of nodes kept from before a Redis outage that Redis has not listed again yet (no live lease seen)."""
        return self._unconfirmed

    def sync_age_s(self) -> float:
        """Seconds since the last successful full resync (inf before the first)."""
        return time.monotonic() - self._synced_at

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Waits until `predicate()` holds (checked after each change); False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.05))
        return True

    # -- life cycle --

    def start(self, timeout_s: float = 5.0) -> None:
        """Starts the thread and returns after its first full sync; raises ClusterStateUnavailable after `timeout_s`."""
        if self._thread is not None:
            raise RuntimeError("ClusterView already started")
        self._thread = threading.Thread(target=self._run, name="splitserve-cluster-view", daemon=True)
        self._thread.start()
        if not self._synced.wait(timeout_s):
            self.stop()
            raise ClusterStateUnavailable(
                f"Redis at {_redacted(self._url)} gave no cluster state within {timeout_s:.1f} s: {self._last_error}"
            )

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the thread, waiting at most `timeout_s`, and closes the connections. Idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("cluster view thread did not stop within %.1f s", timeout_s)
        self._client.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the view thread --

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except Exception as exc:  # the view must outlive Redis outages and any one bad reply
                if self._last_error is None:
                    unexpected = not isinstance(exc, redis.RedisError)
                    logger.warning(
                        "cluster view of %s failed: %r; retrying",
                        _redacted(self._url),
                        exc,
                        exc_info=unexpected,
                    )
                self._last_error = exc
                self._in_outage = self._synced.is_set()
                self._stopping.wait(0.2)

    def _follow(self) -> None:
        """Subscribes, then resyncs (so no event between the snapshot and the stream is missed), then follows."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(EVENTS_CHANNEL, self._expired_channel)
            follow(pubsub, self._stopping, self._on_message, self._resync, self._resync_s)
        finally:
            pubsub.close()

    def _resync(self) -> None:
        rows = self._snapshot(keys=[INDEX_KEY], args=[KEY_PREFIX])
        live = {rows[i].decode(): (rows[i + 1].decode(), rows[i + 2]) for i in range(0, len(rows), 3)}
        known = self._states
        stale = [
            node_id
            for node_id, (gen, _) in live.items()
            if node_id not in known or known[node_id].generation != gen
        ]
        fetched = (
            dict(zip(stale, self._client.mget([node_key(n) for n in stale]), strict=True)) if stale else {}
        )
        if self._in_outage:  # the first resync since Redis came back: give the nodes time to register again
            self._in_outage = False
            self._keep_known_until = time.monotonic() + self._rejoin_grace_s
        states: dict[str, NodeState] = {}
        for node_id, (generation, load_data) in live.items():
            info = (
                known[node_id].info
                if node_id not in fetched
                else self._decode(node_id, fetched[node_id], decode_node)
            )
            if info is None or info.node_id != node_id:
                continue  # expired since the snapshot, or malformed (logged)
            load = None if load_data is None else self._decode(node_id, load_data, decode_load)
            states[node_id] = NodeState(
                info, load if load is None or load.node_id == node_id else None, generation
            )
        carried: set[str] = set()
        if time.monotonic() < self._keep_known_until:
            carried = {node_id for node_id in known if node_id not in states}
            states.update((node_id, known[node_id]) for node_id in carried)
        with self._lock:
            self._states = states
            self._cache = {}
            self._unconfirmed = frozenset(carried)
        self._synced_at = time.monotonic()
        self._last_error = None
        self._synced.set()
        self._notify()

    def _decode(self, node_id: str, data: bytes | None, decode: Callable[[bytes], T]) -> T | None:
        if data is None:
            return None
        try:
            return decode(data)
        except InvalidRecord as exc:
            if node_id not in self._warned:  # once per node, not at every resync
                self._warned.add(node_id)
                logger.warning("ignoring a malformed record of node %s: %s", node_id, exc)
            return None

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._expired_channel:
            key = data.decode(errors="replace")
            if key.startswith(node_key("")):
                self._apply(key.removeprefix(node_key("")), None)
            return
        try:
            event = decode_event(data)
        except InvalidRecord as exc:
            logger.warning("ignoring a malformed cluster event: %s", exc)
            return
        current = self._states.get(event.node_id)
        if event.kind == "deregister":
            self._apply(event.node_id, None)
        elif event.kind == "register" and event.info is not None:
            self._apply(
                event.node_id, NodeState(event.info, current.load if current else None, event.generation)
            )
        elif (
            event.kind == "load"
            and event.load is not None
            and current is not None
            and _newer(event.load, current)
        ):
            self._apply(event.node_id, dataclasses.replace(current, load=event.load))

    def _apply(self, node_id: str, state: NodeState | None) -> None:
        with self._lock:
            if state is not None:
                self._states[node_id] = state
            elif self._states.pop(node_id, None) is None:
                return
            self._cache = {}
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


def _newer(report: LoadReport, state: NodeState) -> bool:
    # Events queued before a resync can be older than it: never step a node's load back in time.
    return state.load is None or report.timestamp >= state.load.timestamp


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
