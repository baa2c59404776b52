"""KV events: which prefix-cache blocks each node holds, kept in Redis for routers (router/kv_index.py reads them).

Each node offers the keys of the full blocks in its prefix cache (engine/prefix_hash.py: a hash chain, equal in every
process). Keys in Redis, beside the node registry of records.py:

    splitserve:v1:kv:<id>      set of 8-byte little-endian block keys the node offers now
    splitserve:v1:kvseq:<id>   string: the sequence number of the last change applied to that set
    splitserve:v1:kv-events    pub/sub channel of JSON batches {"node", "seq", "stored": [...], "removed": [...],
                               "reset": bool}; a reset says "the set was rewritten, read it again"

Node side (`KVEventPublisher`, a daemon thread): every `interval_s` (100 ms) the engine's net changes since the last
batch (engine/kv_events.py) go out as one MULTI: SET kvseq n GET, SADD, SREM, PEXPIRE both keys, PUBLISH. So the rate
is bounded whatever the engine does: one batch per interval, each holding at most one entry per changed key. The
previous sequence number read back tells whether Redis kept the set (a restarted Redis is empty): if not, or at the
first batch, the node rewrites the whole set from the engine's snapshot and publishes a reset. Without changes the
keys' TTL (`KV_TTL_S`) is still renewed every second, so a dead node's set expires by itself.

Router side: subscribe, then read each node's (kvseq, set) in one MULTI; a batch whose seq is not the next one, or a
reset, makes the router read that node again. A lost or stale entry only costs a recompute: the engine looks up its
own cache at admission and never trusts the router's idea of it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cluster.state.records import KEY_PREFIX, InvalidRecord, connect
from engine.kv_events import KVEventBatch, KVEventLog

logger = logging.getLogger(__name__)

KV_EVENTS_CHANNEL = KEY_PREFIX + "kv-events"
KV_TTL_S = 10.0
_RENEW_S = 1.0
_KEY_BYTES = 8
_ADD_CHUNK = 10_000  # members per SADD when rewriting a whole set


def kv_set_key(node_id: str) -> str:
    return f"{KEY_PREFIX}kv:{node_id}"


def kv_seq_key(node_id: str) -> str:
    return f"{KEY_PREFIX}kvseq:{node_id}"


def encode_key(key: int) -> bytes:
    return key.to_bytes(_KEY_BYTES, "little")


def decode_key(data: bytes) -> int:
    if len(data) != _KEY_BYTES:
        raise InvalidRecord(f"a KV block key has {_KEY_BYTES} bytes, not {len(data)}")
    return int.from_bytes(data, "little")


@dataclass(frozen=True, slots=True)
class KVEventMessage:
    node_id: str
    seq: int
    stored: list[int]
    removed: list[int]
    reset: bool = False


def encode_message(message: KVEventMessage) -> bytes:
    return json.dumps(
        {
            "node": message.node_id,
            "seq": message.seq,
            "stored": message.stored,
            "removed": message.removed,
            "reset": message.reset,
        },
        separators=(",", ":"),
    ).encode()


def decode_message(data: bytes) -> KVEventMessage:
    try:
        raw = json.loads(data)
        message = KVEventMessage(
            node_id=str(raw["node"]),
            seq=int(raw["seq"]),
            stored=[int(k) for k in raw["stored"]],
            removed=[int(k) for k in raw["removed"]],
            reset=bool(raw.get("reset", False)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRecord(f"malformed KV event: {exc}") from None
    return message


class KVEventPublisher:
    """The node's thread that mirrors its engine's prefix-cache keys into Redis (see the module doc)."""

    def __init__(
        self,
        redis_url: str,
        node_id: str,
        log: KVEventLog,
        *,
        interval_s: float = 0.1,
        ttl_s: float = KV_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self._client = connect(redis_url)
        self._log = log
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._clock = clock
        self._seq = 0
        self._renewed_at = float("-inf")
        self._needs_reset = True
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches published (resets included), for tests and metrics

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="splitserve-kv-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the thread and removes the node's set (it offers nothing any more). Idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self._client.delete(kv_set_key(self.node_id), kv_seq_key(self.node_id))
        except redis.RedisError as exc:
            logger.warning(
                "could not remove the KV index of %s (it expires by itself): %s", self.node_id, exc
            )
        self._client.close()

    def flush(self) -> None:
        """Publish what changed since the last flush (or rewrite the whole set when Redis lost it)."""
        if self._needs_reset:
            self._reset()
            return
        batch = self._log.drain()
        if not batch.stored and not batch.removed and self._clock() - self._renewed_at < _RENEW_S:
            return
        try:
            self._publish(batch)
        except redis.RedisError:
            self._needs_reset = True  # the batch is lost with the connection: rewrite everything next time
            raise

    def _run(self) -> None:
        failing = False
        while not self._stopping.wait(self._interval_s):
            try:
                self.flush()
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    logger.warning("KV events of %s not published (%s); retrying", self.node_id, exc)
                failing = True

    def _publish(self, batch: KVEventBatch) -> None:
        self._seq += 1
        set_key, seq_key = kv_set_key(self.node_id), kv_seq_key(self.node_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(seq_key, self._seq, px=self._ttl_ms, get=True)
        if batch.stored:
            pipe.sadd(set_key, *map(encode_key, batch.stored))
        if batch.removed:
            pipe.srem(set_key, *map(encode_key, batch.removed))
        pipe.pexpire(set_key, self._ttl_ms)
        message = KVEventMessage(self.node_id, self._seq, batch.stored, batch.removed)
        pipe.publish(KV_EVENTS_CHANNEL, encode_message(message))
        previous = pipe.execute()[0]
        self._renewed_at = self._clock()
        self.batches += 1
        if previous is None or int(previous) != self._seq - 1:
            logger.warning("the KV index of %s was lost in Redis; rewriting it", self.node_id)
            self._reset()

    def _reset(self) -> None:
        keys = self._log.snapshot()
        self._seq += 1
        set_key, seq_key = kv_set_key(self.node_id), kv_seq_key(self.node_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(set_key)
        for start in range(0, len(keys), _ADD_CHUNK):
            pipe.sadd(set_key, *map(encode_key, keys[start : start + _ADD_CHUNK]))
        pipe.pexpire(set_key, self._ttl_ms)
        pipe.set(seq_key, self._seq, px=self._ttl_ms)
        pipe.publish(KV_EVENTS_CHANNEL, encode_message(KVEventMessage(self.node_id, self._seq, [], [], True)))
        try:
            pipe.execute()
        except redis.RedisError:
            self._needs_reset = True
            raise
        self._needs_reset = False
        self._renewed_at = self._clock()
        self.batches += 1
