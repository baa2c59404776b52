"""Cluster state in Redis: the one module that owns its keys and their encoding.

Nodes register a `NodeInfo` under a lease, renew it with heartbeats and publish `LoadReport`s; each router keeps a
`ClusterView`, an in-memory copy refreshed by pub/sub events plus a periodic full resync, so that placing a request
never waits on Redis. Any number of nodes and views share one Redis (standalone; the resync script builds key names
itself, which Redis Cluster forbids).

Key layout (bump the version in the prefix for any incompatible change of the encoding):

    splitserve:v1:node:<id>   string: JSON NodeInfo; expires after the lease TTL (2 s) unless a heartbeat renews it
    splitserve:v1:load:<id>   string: JSON LoadReport; same TTL, renewed only by publishing load, so a node whose
                              load stopped flowing shows no load rather than a stale one
    splitserve:v1:nodes       hash <id> -> generation: the index of registered ids. The generation is a random token
                              new at each registration, so a view refetches a NodeInfo only when it changed.
    splitserve:v1:events      pub/sub channel of JSON `Event`s: register (with the NodeInfo), load (with the report),
                              deregister

A node is live exactly while its node key exists. Node side, in order:
  1. `register(info)`: SET the node key with the TTL, HSET the index, PUBLISH register; one MULTI.
  2. `heartbeat()`, at least every TTL/3 (`LoadPublisher` uses TTL/4): PEXPIRE the node key. If it had expired already
     (a pause longer than the TTL, a restarted Redis), register again under a new generation.
  3. `publish_load(report)`, on change and at least every 100 ms: SET the load key with the TTL, PUBLISH load.
  4. `deregister()`: DEL both keys, HDEL the index, PUBLISH deregister.

Router side, one daemon thread per `ClusterView`: subscribe to the events channel (and to expired-key events), then
resync: a Lua script returns every (id, generation, load) whose node key exists and atomically drops the index
entries of the others. Events are applied as they arrive; the resync repeats every 500 ms.

How a dead node leaves every view: a node that deregisters goes at once (event). A node that dies without
deregistering stops heartbeating; Redis expires its key at most TTL later; a view drops it at once on the expired-key
event where the server sends them (the embedded one does: `notify-keyspace-events Ex`), and otherwise at its next
resync: within TTL + 500 ms = 2.5 s. If Redis itself is unreachable, a view keeps its last state (nodes may well be
serving) and `sync_age_s()` grows; failed calls to a node are the router's signal then.

Threads rather than asyncio: `ClusterView.nodes()` is a plain method that reads memory, so an asyncio router calls
it on its event loop as is, and runs only the bounded `start()` and `stop()` through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, get_args

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "splitserve:v1:"
INDEX_KEY = KEY_PREFIX + "nodes"
EVENTS_CHANNEL = KEY_PREFIX + "events"
Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = get_args(Role)
EventKind = Literal["register", "load", "deregister"]
DEFAULT_TTL_S = 2.0
DEFAULT_RESYNC_S = 0.5
DEFAULT_TIMEOUT_S = 1.0
# Kubernetes pod names fit; no ':' or spaces, so keys and log lines stay unambiguous.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def node_key(node_id: str) -> str:
    return f"{KEY_PREFIX}node:{node_id}"


def load_key(node_id: str) -> str:
    return f"{KEY_PREFIX}load:{node_id}"


class InvalidRecord(ValueError):
    """A record or event read from Redis that does not decode into this version's types."""


class NotRegistered(RuntimeError):
    """A node-side call that needs a registration came before `register()` or after `deregister()`."""


class ClusterStateUnavailable(RuntimeError):
    """Redis did not answer within the time allowed."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_count(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _check_node_id(node_id: object) -> None:
    _check(isinstance(node_id, str) and _NODE_ID.fullmatch(node_id) is not None, f"bad node_id {node_id!r}")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node is; fixed for the life of one registration."""

    node_id: str  # unique in the cluster, e.g. the pod name
    role: Role
    address: str  # host:port of the node's gRPC server
    model: str  # the served model's name
    machine_type: str  # a name from the machine-type catalogue (cost, power)
    kv_capacity_blocks: int  # KV blocks in the node's pool
    block_size: int  # tokens per KV block
    transport: bytes = b""  # the KV transport's local_descriptor(): what a peer needs to connect to this node
    started_at: float = field(default_factory=time.time)  # unix seconds

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        _check(self.role in ROLES, f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        host, _, port = self.address.rpartition(":") if isinstance(self.address, str) else ("", "", "")
        _check(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            f"address must be host:port, not {self.address!r}",
        )
        _check(
            isinstance(self.model, str) and isinstance(self.machine_type, str),
            "model and machine_type are strings",
        )
        _check(
            _is_count(self.kv_capacity_blocks),
            f"kv_capacity_blocks must be >= 0, not {self.kv_capacity_blocks!r}",
        )
        _check(_is_count(self.block_size, 1), f"block_size must be >= 1, not {self.block_size!r}")
        _check(isinstance(self.transport, bytes), "transport must be bytes")
        _check(_is_time(self.started_at), f"started_at must be unix seconds, not {self.started_at!r}")


@dataclass(frozen=True, slots=True)
class LoadReport:
    """How busy a node is right now."""

    node_id: str
    queued_prompt_tokens: int  # prompt tokens admitted but not yet computed
    running_requests: int  # requests in the running batch
    free_kv_blocks: int
    total_kv_blocks: int
    timestamp: float = field(default_factory=time.time)  # unix seconds at the node when measured
    draining: bool = False  # the node finishes what it has and takes nothing new

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        for name in ("queued_prompt_tokens", "running_requests", "free_kv_blocks", "total_kv_blocks"):
            _check(_is_count(getattr(self, name)), f"{name} must be an int >= 0, not {getattr(self, name)!r}")
        _check(self.free_kv_blocks <= self.total_kv_blocks, "free_kv_blocks exceeds total_kv_blocks")
        _check(_is_time(self.timestamp), f"timestamp must be unix seconds, not {self.timestamp!r}")
        _check(isinstance(self.draining, bool), "draining must be a bool")

    def same_load(self, other: LoadReport) -> bool:
        """Equal in everything but the timestamp: publishing it again would tell a router nothing new."""
        return dataclasses.replace(self, timestamp=other.timestamp) == other


@dataclass(frozen=True, slots=True)
class Event:
    """One message on the events channel."""

    kind: EventKind
    node_id: str
    generation: str = ""  # register: the new registration's token
    info: NodeInfo | None = None  # register
    load: LoadReport | None = None  # load


@dataclass(frozen=True, slots=True)
class NodeState:
    """A live node as a view sees it."""

    info: NodeInfo
    load: LoadReport | None  # None until the node's first report, or once its reports stopped for a TTL
    generation: str


# --- encoding: JSON objects, bytes as base64; unknown fields are ignored so that v1 can grow optional fields ---


def _node_to_json(info: NodeInfo) -> dict[str, Any]:
    obj = dataclasses.asdict(info)
    obj["transport"] = base64.b64encode(info.transport).decode("ascii")
    return obj


def _from_json(cls: type[T], obj: object, convert: dict[str, Callable[[Any], Any]] | None = None) -> T:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"{cls.__name__}: expected a JSON object, got {type(obj).__name__}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in obj:
            kwargs[f.name] = (convert or {}).get(f.name, lambda v: v)(obj[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidRecord(f"{cls.__name__}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidRecord(f"{cls.__name__}: {exc}") from exc


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        raise InvalidRecord("transport: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise InvalidRecord(f"transport: {exc}") from exc


def _node_from_json(obj: object) -> NodeInfo:
    return _from_json(NodeInfo, obj, {"transport": _b64})


def _load_from_json(obj: object) -> LoadReport:
    return _from_json(LoadReport, obj)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _loads(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRecord(f"not JSON: {exc}") from exc


def encode_node(info: NodeInfo) -> bytes:
    return _dumps(_node_to_json(info))


def decode_node(data: bytes | str) -> NodeInfo:
    return _node_from_json(_loads(data))


def encode_load(report: LoadReport) -> bytes:
    return _dumps(dataclasses.asdict(report))


def decode_load(data: bytes | str) -> LoadReport:
    return _load_from_json(_loads(data))


def encode_event(event: Event) -> bytes:
    obj: dict[str, Any] = {"kind": event.kind, "node_id": event.node_id, "generation": event.generation}
    if event.info is not None:
        obj["info"] = _node_to_json(event.info)
    if event.load is not None:
        obj["load"] = dataclasses.asdict(event.load)
    return _dumps(obj)


def decode_event(data: bytes | str) -> Event:
    obj = _loads(data)
    if not isinstance(obj, dict) or obj.get("kind") not in get_args(EventKind):
        raise InvalidRecord(f"not an event: {obj!r:.200}")
    info = _node_from_json(obj["info"]) if obj.get("info") is not None else None
    load = _load_from_json(obj["load"]) if obj.get("load") is not None else None
    generation = obj.get("generation", "")
    if not isinstance(generation, str):
        raise InvalidRecord("event generation must be a string")
    try:
        _check_node_id(obj.get("node_id"))
        event = Event(obj["kind"], obj["node_id"], generation, info, load)
    except ValueError as exc:
        raise InvalidRecord(str(exc)) from exc
    if event.kind == "register" and (info is None or not generation):
        raise InvalidRecord("a register event carries the NodeInfo and its generation")
    if event.kind == "load" and load is None:
        raise InvalidRecord("a load event carries the LoadReport")
    if any(x is not None and x.node_id != event.node_id for x in (info, load)):
        raise InvalidRecord("event node_id disagrees with its payload")
    return event


def connect(redis_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A client whose every call is bounded: connect and read timeouts, one quick retry (a dropped connection)."""
    return redis.Redis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    )


def _newer(report: LoadReport, state: NodeState) -> bool:
    # Events queued before a resync can be older than it: never step a node's load back in time.
    return state.load is None or report.timestamp >= state.load.timestamp


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


# --- node side ---


class NodeRegistration:
    """One node's entry in the cluster: `register`, `heartbeat` (at least every TTL/3), `publish_load`, `deregister`.

    Thread-safe; each call is one Redis round trip bounded by `timeout_s` (plus one retry on a dropped connection).
    """

    def __init__(
        self, redis_url: str, *, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not 0.1 <= ttl_s <= 3600:
            raise ValueError(f"ttl_s must be within [0.1, 3600], not {ttl_s}")
        self.ttl_s = ttl_s
        self._ttl_ms = int(ttl_s * 1000)
        self._client = connect(redis_url, timeout_s=timeout_s)
        # Held across the Redis calls, so that a heartbeat that re-registers cannot interleave with a deregister.
        self._lock = threading.Lock()
        self._info: NodeInfo | None = None
        self._generation = ""

    @property
    def info(self) -> NodeInfo | None:
        return self._info

    def register(self, info: NodeInfo) -> None:
        """Announces `info` under a fresh lease; registering again (same node_id) replaces the record."""
        with self._lock:
            if self._info is not None and self._info.node_id != info.node_id:
                raise ValueError(f"already registered as {self._info.node_id!r}: deregister() first")
            self._write_registration(info)

    def _write_registration(self, info: NodeInfo) -> None:
        generation = secrets.token_hex(8)
        event = Event("register", info.node_id, generation, info=info)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(node_key(info.node_id), encode_node(info), px=self._ttl_ms)
        pipe.hset(INDEX_KEY, info.node_id, generation)
        pipe.publish(EVENTS_CHANNEL, encode_event(event))
        pipe.execute()
        self._info, self._generation = info, generation

    def heartbeat(self) -> bool:
        """Renews the lease. False when it had lapsed already and the node was registered again."""
        with self._lock:
            info = self._registered()
            if self._client.pexpire(node_key(info.node_id), self._ttl_ms):
                return True
            logger.warning("lease of node %s had expired; registering again", info.node_id)
            self._write_registration(info)
            return False

    def publish_load(self, report: LoadReport) -> None:
        """Stores `report` for views that resync and announces it to those subscribed; its TTL is the lease's."""
        with self._lock:
            info = self._registered()
            if report.node_id != info.node_id:
                raise ValueError(f"load report of {report.node_id!r} published by node {info.node_id!r}")
            pipe = self._client.pipeline(transaction=False)
            pipe.set(load_key(info.node_id), encode_load(report), px=self._ttl_ms)
            pipe.publish(EVENTS_CHANNEL, encode_event(Event("load", info.node_id, load=report)))
            pipe.execute()

    def deregister(self) -> None:
        """Removes the node from every view at once. Idempotent; a no-op when not registered."""
        with self._lock:
            if self._info is None:
                return
            node_id = self._info.node_id
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(node_key(node_id), load_key(node_id))
            pipe.hdel(INDEX_KEY, node_id)
            pipe.publish(EVENTS_CHANNEL, encode_event(Event("deregister", node_id)))
            pipe.execute()
            self._info, self._generation = None, ""

    def close(self) -> None:
        self._client.close()

    def _registered(self) -> NodeInfo:
        if self._info is None:
            raise NotRegistered("the node is not registered: call register() first")
        return self._info

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.deregister()
        except redis.RedisError as err:
            logger.warning("could not deregister: %s", err)
        finally:
            self.close()


class LoadPublisher:
    """A daemon thread that keeps a registered node's lease and load fresh.

    Every `poll_s` (or at once after `notify()`) it reads `current_load()` and publishes the report when it differs
    from the last one published, or when `period_s` has passed since; never twice within `min_gap_s`. It heartbeats
    every TTL/4. Redis errors are logged and retried on the next tick, never raised: the lease expiring is what
    tells the cluster that this node is gone.
    """

    def __init__(
        self,
        registration: NodeRegistration,
        current_load: Callable[[], LoadReport],
        *,
        period_s: float = 0.1,
        poll_s: float = 0.02,
        min_gap_s: float = 0.01,
    ) -> None:
        if not 0 < min_gap_s <= poll_s <= period_s:
            raise ValueError("need 0 < min_gap_s <= poll_s <= period_s")
        self._registration = registration
        self._current_load = current_load
        self._period_s, self._poll_s, self._min_gap_s = period_s, poll_s, min_gap_s
        self._heartbeat_s = registration.ttl_s / 4
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LoadPublisher already started")
        self._wake.set()  # publish the first report at once
        self._thread = threading.Thread(target=self._run, name="splitserve-load-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """The load changed: publish without waiting for the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the thread (without deregistering: the caller decides). Waits at most `timeout_s`."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("load publisher thread did not stop within %.1f s", timeout_s)

    def _run(self) -> None:
        last: LoadReport | None = None
        last_at = next_heartbeat = float("-inf")
        while not self._stopping.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            gap = self._min_gap_s - (time.monotonic() - last_at)
            if gap > 0 and self._stopping.wait(gap):
                break
            now = time.monotonic()
            try:
                if now >= next_heartbeat:
                    self._registration.heartbeat()
                    next_heartbeat = now + self._heartbeat_s
                report = self._current_load()
                if last is None or not report.same_load(last) or now - last_at >= self._period_s:
                    self._registration.publish_load(report)
                    last, last_at = report, now
                if self._failing:
                    logger.info("publishing load works again")
                self._failing = False
            except Exception as exc:  # a bug in current_load or a Redis error must not kill the lease keeper
                if not self._failing:
                    logger.warning("publishing load failed (retrying every %.2f s): %r", self._poll_s, exc)
                self._failing = True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- router side ---

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
        self, redis_url: str, *, resync_s: float = DEFAULT_RESYNC_S, timeout_s: float = DEFAULT_TIMEOUT_S
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
                self._stopping.wait(0.2)

    def _follow(self) -> None:
        """Subscribes, then resyncs (so no event between the snapshot and the stream is missed), then follows."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(EVENTS_CHANNEL, self._expired_channel)
            self._resync()
            next_resync = time.monotonic() + self._resync_s
            while not self._stopping.is_set():
                wait = min(max(next_resync - time.monotonic(), 0.0), 0.1)
                message = pubsub.get_message(timeout=wait)
                for _ in range(10_000):  # drain what is queued, but keep the resync on time under a flood
                    if message is None:
                        break
                    self._on_message(message["channel"], message["data"])
                    message = pubsub.get_message(timeout=0.0)
                if time.monotonic() >= next_resync:
                    self._resync()
                    next_resync = time.monotonic() + self._resync_s
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
        with self._lock:
            self._states = states
            self._cache = {}
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
