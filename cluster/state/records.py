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
    splitserve:v1:kv:<id>, kvseq:<id>, kv-events: the node's prefix-cache keys (cluster/state/kv_events.py)

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
serving) and `sync_age_s()` grows; failed calls to a node are the router's signal then. When Redis comes back
(a restarted one is empty), the view keeps the nodes it knew for one more TTL, while their heartbeats find their
keys gone and register them again; a node that does not come back within that grace leaves as above.

Threads rather than asyncio: `ClusterView.nodes()` is a plain method that reads memory, so an asyncio router calls
it on its event loop as is, and runs only the bounded `start()` and `stop()` through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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


def _is_finite_non_negative(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf")


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
    # What the machine costs and draws (from its machine type), so a router needs no catalog of its own.
    cost_per_hour: float = 0.0  # USD per machine-hour
    idle_power_w: float = 0.0
    max_power_w: float = 0.0  # its power cap when capped, else its rating
    # The node's latency model as straight lines (PerfSummary): prefill iteration = prompt_fixed_s +
    # prompt_per_token_s * batch prompt tokens; decode iteration = token_fixed_s + token_per_seq_s * batch size.
    # All zero when the node has no performance model (placement then predicts nothing from it).
    perf: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

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
        for name in ("cost_per_hour", "idle_power_w", "max_power_w"):
            _check(
                _is_finite_non_negative(getattr(self, name)),
                f"{name} must be >= 0, not {getattr(self, name)!r}",
            )
        _check(
            isinstance(self.perf, tuple)
            and len(self.perf) == 4
            and all(map(_is_finite_non_negative, self.perf)),
            f"perf must be four numbers >= 0, not {self.perf!r}",
        )


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
    power_w: float = 0.0  # whole-machine power draw now, W
    power_source: str = "modeled"  # "measured" (NVML) or "modeled" (the machine type's power model)
    # The node's prefix cache since it started: full prompt blocks looked up, and those it held (its hit rate).
    prefix_queried_blocks: int = 0
    prefix_hit_blocks: int = 0

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        _check(_is_finite_non_negative(self.power_w), f"power_w must be >= 0, not {self.power_w!r}")
        _check(self.power_source in ("measured", "modeled"), f"bad power_source {self.power_source!r}")
        counts = ("queued_prompt_tokens", "running_requests", "free_kv_blocks", "total_kv_blocks")
        for name in (*counts, "prefix_queried_blocks", "prefix_hit_blocks"):
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
    return _from_json(NodeInfo, obj, {"transport": _b64, "perf": _perf})


def _perf(value: object) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise InvalidRecord("perf: expected a JSON array")
    return tuple(value)


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


def follow(
    pubsub: redis.client.PubSub,
    stopping: threading.Event,
    on_message: Callable[[bytes, bytes], None],
    sync: Callable[[], None],
    period_s: float,
) -> None:
    """A subscriber's loop: sync() now (the caller subscribed first, so nothing published after it is missed) and
    every period_s, and on_message(channel, data) for each message in between, until stopping is set. A flood is
    drained in bounded bites so the periodic sync stays on time."""
    sync()
    next_sync = time.monotonic() + period_s
    while not stopping.is_set():
        message = pubsub.get_message(timeout=min(max(next_sync - time.monotonic(), 0.0), 0.1))
        for _ in range(10_000):
            if message is None:
                break
            on_message(message["channel"], message["data"])
            message = pubsub.get_message(timeout=0.0)
        if time.monotonic() >= next_sync:
            sync()
            next_sync = time.monotonic() + period_s


def connect(redis_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A client whose every call is bounded: connect and read timeouts, one quick retry (a dropped connection)."""
    return redis.Redis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    )
