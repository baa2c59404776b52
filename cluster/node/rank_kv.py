"""KV from rank to rank: each tensor-parallel rank of a prefill node writes the KV heads it holds straight into the
decode ranks that hold them, through a transport of its own, at any pair of degrees (a TP 1 node is one rank).

Routes (`kv_routes`): for each receiving rank and each KV head it holds, the first sending rank that holds the head
sends it; consecutive heads from one sender form one route. Between equal degrees rank i sends rank i its whole
blocks; otherwise a route is a HeadSlice (kvtransfer/layout.py): those heads of each block. Replicated heads (more
ranks than KV heads) are sent once, by the first rank holding them, to every receiving rank that holds them.

Pieces:
- RankKV: one rank's transport over that rank's own pool, in every rank's process (rank 0's node process and each
  worker rank's, where the engine builds it by name: `rank_extension()`, engine/tensor_parallel/rank_calls.py).
  It keeps each request's write handles, so that rank 0 can ask how they stand. A TP 1 node's only rank uses the
  node's own transport (`shares_transport`); worker ranks and rank 0 of a split node have their own.
- RankedKV: rank 0's view of all of them: it publishes every rank's descriptor and KV heads with the node's
  (NodeDescriptor.tp_ranks), connects each rank along its routes, fans writes out, sums up states, and, on a decode
  node, turns the ranks' notifications into one per request once every route's has arrived.
- TensorParallelTransport: the node's transport as its services see it: the whole-heads transport (peers without
  ranks, prefix blocks lent between nodes) plus `ranks`.
Writes made while the prompt is computed come from the step's layer plan: rank 0's prefill service lists, before
each step, which blocks of which request go to which peer; every rank gets the list with the step and writes its
routes' heads of those blocks right after each layer is stored, so the transfer overlaps the rest of the forward.
Completion: once every rank's writes are done, each rank sends `kv-done:<request id>` along each of its routes
(one connection keeps its writes in order), and the decode node admits the request when every route's has arrived.
Fences work the same way. Which peers go rank to rank: those that publish ranks, unless both are TP 1 (the
whole-heads path is the same thing there).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cluster.addresses import default_ucx_net_devices
from engine.config import RankExtension
from engine.tensor_parallel.rank_calls import RankCallFailed, RankChannel
from kvtransfer import create_transport
from kvtransfer.base import (
    DEFAULT_TRANSFER_TIMEOUT_S,
    KVTransport,
    PeerId,
    TransferError,
    TransferHandle,
    TransferState,
)
from kvtransfer.descriptor import NodeDescriptor, RankDescriptor, with_tp_ranks
from kvtransfer.layout import HeadSlice
from kvtransfer.notifications import parse_kv_done, parse_kv_fence

# A first call waits for the worker to come up (its model and transport); a worker's connect waits for the peer.
FIRST_CALL_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0
CONNECT_CALL_TIMEOUT_S = 60.0
ARRIVAL_TTL_S = 600.0  # a notification some route never delivered (its write failed) is forgotten then

_T = TypeVar("_T")
HeadRanges = list[tuple[int, int]]  # per rank, the KV heads [start, stop) it holds
_RANK_ID = re.compile(r"^(?P<node>.+)\.tp(?P<rank>\d+)of(?P<world>\d+)$")


def rank_node_id(node_id: str, rank: int, world: int) -> str:
    """The transport id of rank `rank` of a node split `world` ways (peers see it in their notifications)."""
    return f"{node_id}.tp{rank}of{world}"


def parse_rank_id(sender: str) -> tuple[str, int, int] | None:
    """(node, rank, world) of a rank's transport id; None for a node's own transport (a TP 1 node's only rank)."""
    match = _RANK_ID.match(sender)
    return None if match is None else (match["node"], int(match["rank"]), int(match["world"]))


@dataclass(frozen=True, slots=True)
class Route:
    """Sending rank src writes `heads` of each block into receiving rank dst (None: whole blocks)."""

    src: int
    dst: int
    heads: HeadSlice | None


def kv_routes(senders: HeadRanges, receivers: HeadRanges) -> list[Route]:
    """Which sending rank writes which KV heads into which receiving rank (see the module docstring)."""
    routes: list[Route] = []
    for dst, (first, stop) in enumerate(receivers):
        runs: list[tuple[int, int, int]] = []  # (sender, first head, count)
        for head in range(first, stop):
            src = next((r for r, (a, b) in enumerate(senders) if a <= head < b), None)
            if src is None:
                raise ValueError(f"no sending rank holds KV head {head}")
            if runs and runs[-1][0] == src and runs[-1][1] + runs[-1][2] == head:
                runs[-1] = (src, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((src, head, 1))
        for src, head, count in runs:
            whole = senders[src] == (head, head + count) == receivers[dst]
            routes.append(
                Route(src, dst, None if whole else HeadSlice(head - senders[src][0], head - first, count))
            )
    return routes


@dataclass(frozen=True, slots=True)
class RankWrite:
    """In a step's layer plan: request `request_id`'s blocks src (this node) -> dst (at peer `peer`), every layer."""

    peer: str  # the peer node's id; each rank writes along its own routes to that peer
    request_id: str
    src: list[int]
    dst: list[int]


def rank_extension(
    backend: str, node_id: str, world: int, transport_options: dict[str, Any]
) -> RankExtension:
    """What the engine's worker ranks build: a RankKV over their pool, by name (they are other processes)."""
    options = {"backend": backend, "node_id": node_id, "world": world, "transport_options": transport_options}
    return RankExtension("cluster.node.rank_kv", "start_rank_kv", options)


def open_transport(
    backend: str, transport_id: str, kv_pool: list[torch.Tensor], options: dict[str, Any]
) -> KVTransport:
    """A node's or a rank's KV transport over its pool, registered. options: transfer_timeout_s, host (the address
    peers dial: the torch transport binds it alone; for NIXL, UCX's TCP transport takes that address's interface and
    any RDMA ports) and, for torch, cluster_token."""
    extra = dict(options)
    if backend == "nixl":
        default_ucx_net_devices(extra.pop("host", "127.0.0.1"))
        extra.pop("cluster_token", None)
    transport = create_transport(backend, transport_id, **extra)
    transport.register(kv_pool)
    return transport


def start_rank_kv(
    rank: int,
    kv_caches: list[torch.Tensor],
    *,
    backend: str,
    node_id: str,
    world: int,
    transport_options: dict[str, Any],
) -> RankKV:
    """A rank's own transport over its pool (a worker rank, or rank 0 of a split node)."""
    return RankKV(
        rank, open_transport(backend, rank_node_id(node_id, rank, world), kv_caches, transport_options)
    )


class RankKV:
    """One rank's transport over its own KV pool, its routes to each peer, and the writes it issued per request.
    Thread-safe."""

    def __init__(self, rank: int, transport: KVTransport, shares_transport: bool = False) -> None:
        self.rank = rank
        self.transport = transport
        # A TP 1 node's rank uses the node's own transport: its notifications arrive there (RankedKV.receive)
        # and closing it is the node's business.
        self.shares_transport = shares_transport
        self._routes: dict[str, list[tuple[PeerId, HeadSlice | None]]] = {}
        self._writes: dict[str, list[TransferHandle]] = {}
        self._errors: dict[str, str] = {}  # requests a write of which could not even be issued
        self._lock = threading.Lock()

    def descriptor(self) -> bytes:
        return self.transport.local_descriptor()

    def connect(self, peer: str, routes: list[tuple[bytes, HeadSlice | None]]) -> None:
        """Open (or renew) the paths to the peer's ranks this rank writes to; TransferError when one cannot."""
        connected = [
            (self.transport.connect(descriptor, head_slices=heads is not None), heads)
            for descriptor, heads in routes
        ]
        with self._lock:
            self._routes[peer] = connected

    def write(
        self,
        peer: str,
        request_id: str,
        layers: list[int],
        src: list[int],
        dst: list[int],
        notify: bytes | None = None,
    ) -> None:
        """Write src -> dst of each layer along each route to peer (the notify payload with the last layer); a
        failure is kept for state(). A rank without routes to the peer (its heads are sent by another) writes
        nothing."""
        with self._lock:
            routes = self._routes.get(peer)
            handles = self._writes.setdefault(request_id, [])
        if routes is None:
            self.record_failure(request_id, f"rank {self.rank} is not connected to {peer!r}")
            return
        for peer_id, heads in routes:
            for i, layer in enumerate(layers):
                last = notify if i == len(layers) - 1 else None
                try:
                    handle = self.transport.write_blocks(peer_id, layer, src, dst, last, heads)
                except (TransferError, ValueError) as exc:
                    self.record_failure(request_id, f"rank {self.rank}: {exc}")
                    return
                with self._lock:
                    handles.append(handle)

    def on_layer_stored(self, layer: int, plan: list[RankWrite]) -> None:
        """In a step: this rank's heads of the plan's blocks of `layer`, just stored. Never raises (the engine's
        forward runs it): a failure shows in state()."""
        for item in plan:
            try:
                self.write(item.peer, item.request_id, [layer], item.src, item.dst)
            except Exception as exc:  # anything else is this request's failure, not the step's
                self.record_failure(item.request_id, f"rank {self.rank}: {type(exc).__name__}: {exc}")

    def state(self, request_id: str) -> tuple[str, str | None, int]:
        """(state, error, bytes) of every write issued for request_id here: "failed" if any failed, "pending" if
        any is in flight, else "done" (also with no writes)."""
        with self._lock:
            handles = list(self._writes.get(request_id, ()))
            error = self._errors.get(request_id)
        states = [self.transport.poll(h) for h in handles]
        failed = next((h for h, s in zip(handles, states, strict=True) if s is TransferState.FAILED), None)
        if error is None and failed is not None:
            error = f"rank {self.rank}: a KV write failed: {failed.error or 'peer gone?'}"
        sent = sum(h.num_bytes for h in handles)
        if error is not None:
            return TransferState.FAILED.value, error, sent
        if any(s is TransferState.PENDING for s in states):
            return TransferState.PENDING.value, None, sent
        return TransferState.DONE.value, None, sent

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._writes.pop(request_id, None)
            self._errors.pop(request_id, None)

    def notifications(self) -> list[tuple[str, bytes]]:
        """What this rank's own transport received (a shared transport's come through RankedKV.receive)."""
        if self.shares_transport:
            return []
        return [(str(peer), payload) for peer, payload in self.transport.notifications()]

    def close(self) -> None:
        if not self.shares_transport:
            self.transport.close()

    def record_failure(self, request_id: str, error: str) -> None:
        """A write of request_id that failed before it became a handle (kept for state())."""
        with self._lock:
            self._errors.setdefault(request_id, error)


class RankedKV:
    """Rank 0's side: its own RankKV and calls to the workers' (rank order), presented as one node's ranks.

    heads_of(world): the KV heads each rank holds when this model is split `world` ways (the same for peers)."""

    def __init__(
        self, local: RankKV, channels: list[RankChannel], heads_of: Callable[[int], HeadRanges]
    ) -> None:
        self.local = local
        self.channels = channels
        self.world = 1 + len(channels)
        self.heads_of = heads_of
        self.kv_heads = heads_of(self.world)
        self._descriptors = [local.descriptor()] + [
            channel.call("descriptor", timeout_s=FIRST_CALL_TIMEOUT_S) for channel in channels
        ]
        # (peer node, payload) -> ((sending rank, receiving rank) pairs seen, when the first came): a decode
        # node's arrivals, complete once every route from that peer's degree has delivered.
        self._arrivals: dict[tuple[str, bytes], tuple[frozenset[tuple[int, int]], float]] = {}
        self._received: list[tuple[str, bytes]] = []  # rank 0's, when it shares the node's transport
        self._lock = threading.Lock()

    async def off_loop(self, method: Callable[..., _T], *args: Any) -> _T:
        """method(*args) for the event loop: on a worker thread when it calls worker ranks (a pipe round trip
        each), at once when this node is one rank (its answers are local and quick)."""
        if not self.channels:
            return method(*args)
        return await asyncio.to_thread(method, *args)

    def rank_descriptors(self) -> tuple[RankDescriptor, ...]:
        return tuple(
            RankDescriptor(d, heads) for d, heads in zip(self._descriptors, self.kv_heads, strict=True)
        )

    def serves(self, peer: NodeDescriptor) -> bool:
        """Whether writes to this peer go rank to rank: it publishes its ranks, split as this model splits, and
        one of the two is split at all (two TP 1 nodes use their one transport as it is)."""
        heads = [r.kv_heads for r in peer.tp_ranks]
        if not heads or (self.world == 1 and len(heads) == 1):
            return False
        try:
            return heads == self.heads_of(len(heads))
        except Exception:  # a degree this model cannot be split into: not a peer of this model
            return False

    def connect(self, peer: NodeDescriptor) -> str:
        """Connect every rank along its routes to the peer's ranks; the key writes name the peer by.
        TransferError if a path cannot be opened."""
        key = peer.node_id
        routes = kv_routes(self.kv_heads, [r.kv_heads for r in peer.tp_ranks])
        for rank in range(self.world):
            mine = [(peer.tp_ranks[r.dst].descriptor, r.heads) for r in routes if r.src == rank]
            if rank == 0:
                self.local.connect(key, mine)
                continue
            try:
                self.channels[rank - 1].call("connect", key, mine, timeout_s=CONNECT_CALL_TIMEOUT_S)
            except RankCallFailed as exc:
                raise TransferError(str(exc)) from exc
        return key

    def write(
        self,
        peer: str,
        request_id: str,
        layers: list[int],
        src: list[int],
        dst: list[int],
        notify: bytes | None = None,
    ) -> None:
        """Every rank writes its routes' heads of src -> dst of each layer (notify rides on each route's last)."""
        self.local.write(peer, request_id, layers, src, dst, notify)
        for channel in self.channels:
            try:
                channel.call("write", peer, request_id, layers, src, dst, notify, timeout_s=CALL_TIMEOUT_S)
            except RankCallFailed as exc:
                self.local.record_failure(request_id, str(exc))

    def state(self, request_id: str) -> tuple[TransferState, str | None, int]:
        """Every rank's writes of request_id together: FAILED (with why) if any failed, PENDING, or DONE."""
        results = [self.local.state(request_id)]
        for channel in self.channels:
            try:
                results.append(channel.call("state", request_id, timeout_s=CALL_TIMEOUT_S))
            except RankCallFailed as exc:
                results.append((TransferState.FAILED.value, str(exc), 0))
        sent = sum(r[2] for r in results)
        failed = next((r for r in results if r[0] == TransferState.FAILED.value), None)
        if failed is not None:
            return TransferState.FAILED, failed[1], sent
        if any(r[0] == TransferState.PENDING.value for r in results):
            return TransferState.PENDING, None, sent
        return TransferState.DONE, None, sent

    def forget(self, request_id: str) -> None:
        self.local.forget(request_id)
        for channel in self.channels:
            with contextlib.suppress(RankCallFailed):  # a rank that is gone holds nothing any more
                channel.call("forget", request_id, timeout_s=CALL_TIMEOUT_S)

    def receive(self, sender: str, payload: bytes) -> None:
        """A notification from a peer's rank that arrived on the node's own transport (shared by rank 0)."""
        with self._lock:
            self._received.append((sender, payload))

    def notifications(self) -> list[tuple[str, bytes]]:
        """(peer node, payload) of each notification every route has now delivered (once); never blocks long."""
        now = time.monotonic()
        with self._lock:
            rank0, self._received = self._received, []
        got = [rank0 + self.local.notifications()]
        for channel in self.channels:
            try:
                got.append(channel.call("notifications", timeout_s=CALL_TIMEOUT_S))
            except RankCallFailed:
                got.append([])  # the engine's liveness check takes the node down; nothing completes meanwhile
        complete: list[tuple[str, bytes]] = []
        with self._lock:
            for receiver, notes in enumerate(got):
                for sender, payload in notes:
                    self._count(sender, receiver, payload, now, complete)
            for key in [k for k, (_, first) in self._arrivals.items() if now - first > ARRIVAL_TTL_S]:
                del self._arrivals[key]
        return complete

    def _count(
        self, sender: str, receiver: int, payload: bytes, now: float, complete: list[tuple[str, bytes]]
    ) -> None:
        node, rank, world = parse_rank_id(sender) or (sender, 0, 1)
        try:
            expected = {(r.src, r.dst) for r in kv_routes(self.heads_of(world), self.kv_heads)}
        except Exception:  # a sender of a degree this model does not split into: not ours
            return
        key = (node, payload)
        seen, first = self._arrivals.get(key, (frozenset(), now))
        seen |= {(rank, receiver)}
        if seen >= expected:
            self._arrivals.pop(key, None)
            complete.append(key)
        else:
            self._arrivals[key] = (seen, first)

    def discard_arrivals(self, request_id: str) -> None:
        """Forget the routes' partial notifications of request_id (a new reservation of it starts afresh)."""
        with self._lock:
            for key in [
                k for k in self._arrivals if request_id in (parse_kv_done(k[1]), parse_kv_fence(k[1]))
            ]:
                del self._arrivals[key]

    def close(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(RankCallFailed):
                channel.call("close", timeout_s=CALL_TIMEOUT_S)
        self.local.close()


class TensorParallelTransport(KVTransport):
    """A prefill or decode node's transport with ranks: the whole-heads transport (over rank 0's transfer pool at
    TP > 1, the pool itself at TP 1), which it delegates to, plus `ranks`. Its descriptor carries both; what the
    node's own transport receives from peers' ranks goes to `ranks` (a TP 1 node's rank shares it)."""

    def __init__(self, whole: KVTransport, ranks: RankedKV) -> None:
        self.whole = whole
        self.ranks = ranks
        self.name = whole.name
        self.transfer_timeout_s = getattr(whole, "transfer_timeout_s", DEFAULT_TRANSFER_TIMEOUT_S)

    def register(self, kv_layers: list[torch.Tensor]) -> None:
        self.whole.register(kv_layers)

    def local_descriptor(self) -> bytes:
        return with_tp_ranks(self.whole.local_descriptor(), self.ranks.rank_descriptors())

    def connect(self, peer_descriptor: bytes, head_slices: bool = False) -> PeerId:
        return self.whole.connect(peer_descriptor, head_slices)

    def write_blocks(
        self,
        peer: PeerId,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        notify: bytes | None = None,
        heads: HeadSlice | None = None,
    ) -> TransferHandle:
        return self.whole.write_blocks(peer, layer, src_blocks, dst_blocks, notify, heads)

    def poll(self, handle: TransferHandle) -> TransferState:
        return self.whole.poll(handle)

    def notifications(self) -> list[tuple[PeerId, bytes]]:
        """The whole-heads path's notifications; those a peer's rank sent go to `ranks` instead."""
        mine = []
        for sender, payload in self.whole.notifications():
            if parse_rank_id(sender) is not None:
                self.ranks.receive(sender, payload)
            else:
                mine.append((sender, payload))
        return mine

    def close(self) -> None:
        try:
            self.ranks.close()
        finally:
            self.whole.close()
