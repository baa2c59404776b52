"""KV from rank to rank: a tensor-parallel prefill node's ranks write their KV heads straight into the decode ranks
that hold the same heads, each through a transport of its own, instead of through rank 0's whole-heads transfer pool.

When: the prefill and the decode node run at the same tensor-parallel degree (so rank i holds the same KV heads on
both sides, and its blocks copy whole). Any other pair of degrees, and the prefix blocks nodes lend each other, go
through the transfer pool as before (engine/tensor_parallel/kv_resharding.py).

Pieces:
- RankKV: one rank's transport over that rank's own pool, in every rank's process (rank 0's node process and each
  worker rank's, where the engine builds it by name: `rank_extension()` and engine/tensor_parallel/rank_calls.py).
  It keeps the handles of each request's writes, so that rank 0 can ask how they stand.
- RankedKV: rank 0's view of all of them: it publishes every rank's descriptor with the node's
  (NodeDescriptor.tp_ranks), connects rank i to the peer's rank i, fans writes out, sums up states, and, on a decode
  node, turns the ranks' notifications into one per request once every rank has it.
Writes made while the prompt is computed come from the step's layer plan: rank 0's prefill service lists, before
each step, which blocks of which request go where; every rank gets the list with the step and writes its own heads of
those blocks right after each layer is stored, so the transfer overlaps the rest of the forward on every rank.
Completion: each rank sends `kv-done:<request id>` on its own connection after every write of the request completed
(one connection keeps its writes in order), and the decode node admits the request once all of its ranks have it.
Fences work the same way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
from kvtransfer.notifications import parse_kv_done, parse_kv_fence

RANK_SUFFIX = ".tp"
# A worker's transport starts with its model: the first calls wait for the worker to come up.
FIRST_CALL_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0
CONNECT_CALL_TIMEOUT_S = (
    60.0  # a worker's connect waits for the peer's rank (the transport's own bound is lower)
)


def rank_node_id(node_id: str, rank: int) -> str:
    """The transport id of a node's rank (peers see it in their notifications)."""
    return f"{node_id}{RANK_SUFFIX}{rank}"


def node_of_rank(rank_id: str) -> str:
    return rank_id.rsplit(RANK_SUFFIX, 1)[0]


@dataclass(frozen=True, slots=True)
class RankWrite:
    """In a step's layer plan: request `request_id`'s blocks src (this node) -> dst (at peer `peer`), every layer."""

    peer: str  # the peer node's id: each rank writes to the peer's rank of its own index
    request_id: str
    src: list[int]
    dst: list[int]


def rank_extension(backend: str, node_id: str, transport_options: dict[str, Any]) -> RankExtension:
    """What the engine's worker ranks build: a RankKV over their pool, by name (they are other processes)."""
    return RankExtension(
        "cluster.node.rank_kv",
        "start_rank_kv",
        {"backend": backend, "node_id": node_id, "transport_options": transport_options},
    )


def start_rank_kv(
    rank: int, kv_caches: list[torch.Tensor], *, backend: str, node_id: str, transport_options: dict[str, Any]
) -> RankKV:
    """Worker rank side of rank_extension()."""
    if backend == "nixl":  # UCX's TCP transport on the advertised address's interface, as on rank 0
        from cluster.addresses import default_ucx_net_devices

        default_ucx_net_devices(transport_options.get("host", "127.0.0.1"))
    options = {k: v for k, v in transport_options.items() if backend == "torch" or k != "host"}
    return RankKV(rank, kv_caches, backend, node_id, options)


class RankKV:
    """One rank's transport over its own KV pool, and the writes it issued per request. Thread-safe."""

    def __init__(
        self, rank: int, kv_caches: list[torch.Tensor], backend: str, node_id: str, options: dict[str, Any]
    ) -> None:
        self.rank = rank
        self.transport = create_transport(backend, rank_node_id(node_id, rank), **options)
        self.transport.register(kv_caches)
        self._peers: dict[str, PeerId] = {}
        self._writes: dict[str, list[TransferHandle]] = {}
        self._errors: dict[str, str] = {}  # requests a write of which could not even be issued
        self._lock = threading.Lock()

    def descriptor(self) -> bytes:
        return self.transport.local_descriptor()

    def connect(self, peer: str, descriptor: bytes) -> None:
        """Open (or renew) the path to the peer's rank of this index; TransferError when it cannot."""
        peer_id = self.transport.connect(descriptor)
        with self._lock:
            self._peers[peer] = peer_id

    def write(
        self,
        peer: str,
        request_id: str,
        layers: list[int],
        src: list[int],
        dst: list[int],
        notify: bytes | None = None,
    ) -> None:
        """Write src -> dst of each layer (the notify payload on the last); a failure is kept for state()."""
        with self._lock:
            peer_id = self._peers.get(peer)
            handles = self._writes.setdefault(request_id, [])
        if peer_id is None:
            self._fail(request_id, f"rank {self.rank} is not connected to {peer!r}")
            return
        for i, layer in enumerate(layers):
            try:
                handle = self.transport.write_blocks(
                    peer_id, layer, src, dst, notify if i == len(layers) - 1 else None
                )
            except (TransferError, ValueError) as exc:
                self._fail(request_id, f"rank {self.rank}: {exc}")
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
                self._fail(item.request_id, f"rank {self.rank}: {type(exc).__name__}: {exc}")

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
        return [(str(peer), payload) for peer, payload in self.transport.notifications()]

    def close(self) -> None:
        self.transport.close()

    def _fail(self, request_id: str, error: str) -> None:
        with self._lock:
            self._errors.setdefault(request_id, error)


class RankedKV:
    """Rank 0's side: its own RankKV and calls to the workers' (rank order), presented as one node's ranks."""

    def __init__(self, local: RankKV, channels: list[RankChannel], kv_heads: list[tuple[int, int]]) -> None:
        self.local = local
        self.channels = channels
        self.world = 1 + len(channels)
        self.kv_heads = kv_heads
        self._descriptors = [local.descriptor()] + [
            channel.call("descriptor", timeout_s=FIRST_CALL_TIMEOUT_S) for channel in channels
        ]
        # (peer node, payload) -> (the ranks that have it, when the first did): a decode node's arrivals
        self._arrivals: dict[tuple[str, bytes], tuple[frozenset[int], float]] = {}
        self._arrivals_lock = threading.Lock()
        self.arrival_ttl_s = 600.0  # a notification some rank never got (its write failed) is forgotten then

    def rank_descriptors(self) -> tuple[RankDescriptor, ...]:
        return tuple(
            RankDescriptor(d, heads) for d, heads in zip(self._descriptors, self.kv_heads, strict=True)
        )

    def serves(self, peer: NodeDescriptor) -> bool:
        """Whether writes to this peer can go rank to rank: the same degree, each rank holding the same heads."""
        return len(peer.tp_ranks) == self.world and [r.kv_heads for r in peer.tp_ranks] == self.kv_heads

    def connect(self, peer: NodeDescriptor) -> str:
        """Connect each rank to the peer's rank of its index; the key writes name the peer by. TransferError."""
        key = peer.node_id
        self.local.connect(key, peer.tp_ranks[0].descriptor)
        for rank, channel in enumerate(self.channels, start=1):
            try:
                channel.call("connect", key, peer.tp_ranks[rank].descriptor, timeout_s=CONNECT_CALL_TIMEOUT_S)
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
        """Every rank writes its heads of src -> dst of each layer (notify rides on each rank's last write)."""
        self.local.write(peer, request_id, layers, src, dst, notify)
        for channel in self.channels:
            try:
                channel.call("write", peer, request_id, layers, src, dst, notify, timeout_s=CALL_TIMEOUT_S)
            except RankCallFailed as exc:
                self.local._fail(request_id, str(exc))

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

    def notifications(self) -> list[tuple[str, bytes]]:
        """(peer node, payload) of each notification every rank has now received (once); never blocks long."""
        now = time.monotonic()
        got = [self.local.notifications()]
        for channel in self.channels:
            try:
                got.append(channel.call("notifications", timeout_s=CALL_TIMEOUT_S))
            except RankCallFailed:
                got.append([])  # the engine's liveness check takes the node down; nothing completes meanwhile
        complete: list[tuple[str, bytes]] = []
        with self._arrivals_lock:
            self._count_arrivals(got, now, complete)
        return complete

    def _count_arrivals(
        self, got: list[list[tuple[str, bytes]]], now: float, complete: list[tuple[str, bytes]]
    ) -> None:
        for rank, rank_notes in enumerate(got):
            for rank_id, payload in rank_notes:
                key = (node_of_rank(rank_id), payload)
                ranks, first = self._arrivals.get(key, (frozenset(), now))
                ranks |= {rank}
                if len(ranks) == self.world:
                    self._arrivals.pop(key, None)
                    complete.append(key)
                else:
                    self._arrivals[key] = (ranks, first)
        for key in [k for k, (_, first) in self._arrivals.items() if now - first > self.arrival_ttl_s]:
            del self._arrivals[key]

    def discard_arrivals(self, request_id: str) -> None:
        """Forget the ranks' partial notifications of request_id (a new reservation of it starts afresh)."""
        for key in [k for k in self._arrivals if request_id in (parse_kv_done(k[1]), parse_kv_fence(k[1]))]:
            del self._arrivals[key]

    def close(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(RankCallFailed):
                channel.call("close", timeout_s=CALL_TIMEOUT_S)
        self.local.close()


class TensorParallelTransport(KVTransport):
    """A tensor-parallel prefill or decode node's transport: the whole-heads transport over rank 0's transfer pool
    (what every peer can use, and what this delegates to), plus the ranks' own (`ranks`), which the node's services
    use with peers of the same degree. Its descriptor carries both."""

    def __init__(self, whole: KVTransport, ranks: RankedKV) -> None:
        self.whole = whole
        self.ranks = ranks
        self.name = whole.name
        self.transfer_timeout_s = getattr(whole, "transfer_timeout_s", DEFAULT_TRANSFER_TIMEOUT_S)

    def register(self, kv_layers: list[torch.Tensor]) -> None:
        self.whole.register(kv_layers)

    def local_descriptor(self) -> bytes:
        return with_tp_ranks(self.whole.local_descriptor(), self.ranks.rank_descriptors())

    def connect(self, peer_descriptor: bytes) -> PeerId:
        return self.whole.connect(peer_descriptor)

    def write_blocks(
        self,
        peer: PeerId,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        notify: bytes | None = None,
    ) -> TransferHandle:
        return self.whole.write_blocks(peer, layer, src_blocks, dst_blocks, notify)

    def poll(self, handle: TransferHandle) -> TransferState:
        return self.whole.poll(handle)

    def notifications(self) -> list[tuple[PeerId, bytes]]:
        return self.whole.notifications()

    def close(self) -> None:
        try:
            self.ranks.close()
        finally:
            self.whole.close()
