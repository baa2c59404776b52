"""The KV transport contract: how a prefill node writes a prompt's KV, layer by layer, into a decode node's blocks.

One transport object per node, created by `kvtransfer.create_transport(name, node_id, ...)`. The protocol, in order:

1. `register(kv_layers)`: once, the node's whole paged pool (`engine.kv_layers`); it stays registered until close().
2. `local_descriptor() -> bytes`: what a peer needs to reach this node (its id, pool layout, addresses); the node
   publishes it in the cluster state.
3. `connect(peer_descriptor, head_slices=False) -> PeerId`: the writing side (prefill) opens a path to a receiving
   side (decode). It checks that the two pools agree on everything but their number of blocks (and, with
   head_slices, their number of KV heads) and raises TransferError when they do not or when the peer cannot be
   reached. Idempotent: connecting again to the same descriptor returns the same
   PeerId (the peer's node id); a new descriptor under the same node id (the peer restarted) replaces the old path.
4. `write_blocks(peer, layer, src_blocks, dst_blocks, notify, heads) -> TransferHandle`: one-sided write of local
   blocks `src_blocks[i]` of `layer` into the peer's blocks `dst_blocks[i]` of the same layer; with a HeadSlice,
   only those KV heads (tensor-parallel ranks of different degrees, cluster/node/rank_kv.py). Whole-block writes
   need pools with the same KV heads. The receiving node's code
   does nothing per write. The source blocks must stay unchanged until the handle settles. Bad arguments raise
   ValueError; a transport failure never raises here but shows as a FAILED handle.
5. `poll(handle) -> TransferState`: PENDING, then DONE or FAILED for good. Each write has a deadline (the
   transport's `transfer_timeout_s`): a write still pending past it is FAILED. `wait(handles, timeout_s)` polls a
   group of handles and never blocks longer than its timeout.
6. `notifications() -> [(PeerId, bytes)]`: on the receiving node, the `notify` payload of each write whose data is
   completely in place, once per write. Writes with notify=None announce nothing. There is no order across writes
   (NIXL sends each announcement when its own write completes), so a payload names what arrived, e.g. "request R,
   layer L", and the receiver counts.
7. `close()`: releases memory registrations, connections and threads; idempotent, bounded in time.

What DONE means on the writer: with NIXL, the data is in the peer's memory; with torch.distributed, the data has left
this node. The receiver's signal that a layer arrived is always its notification. After a FAILED write, the
destination blocks hold unspecified bytes and may still be written by data in flight until the connection is torn
down: a decode node should not hand a failed request's blocks to another request before `transfer_timeout_s` has
passed, unless the writer says sooner that nothing more will come: one peer's writes land in the order they were
issued, so a last write that only announces (no blocks, a notify payload such as `kv-fence:<request id>`, see
kvtransfer/notifications.py) arrives after every earlier write of that request.

Errors: ValueError for caller bugs (bad layer or block ids, write before register), TransferError for expected
failures (peer unreachable, incompatible layouts, not connected, transport closed), TransferTimeout from wait().
Every method may be called from any thread.
"""

from __future__ import annotations

import abc
import enum
import operator
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import NewType

import torch

from kvtransfer.layout import HeadSlice, KVLayout

PeerId = NewType("PeerId", str)  # the peer's node id, the same on every node that talks to it

MAX_NOTIFY_BYTES = 4096  # notify payloads are short ids ("request R, layer L"), not data
DEFAULT_TRANSFER_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0

_settle_lock = threading.Lock()


class TransferError(Exception):
    """An expected transport failure: peer unreachable or gone, incompatible layouts, not connected, closed."""


class TransferTimeout(TransferError):
    """wait() ran out of time with writes still pending."""


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True, eq=False)
class TransferHandle:
    """One write_blocks call. Backends subclass it to keep their per-write state; callers only poll it."""

    peer: PeerId
    layer: int
    num_bytes: int  # payload bytes (blocks x block_bytes, or the head slice's share of them)
    deadline: float  # time.monotonic() after which a pending write is FAILED
    state: TransferState = TransferState.PENDING
    error: str | None = None  # why it FAILED
    started: float = field(default_factory=time.monotonic)

    def settle(self, state: TransferState, error: str | None = None) -> bool:
        """Move a PENDING handle to DONE or FAILED; False (no change) if it had already settled."""
        with _settle_lock:
            if self.state is not TransferState.PENDING:
                return False
            self.state, self.error = state, error
            return True

    def expire_if_late(self, now: float | None = None) -> bool:
        """Mark a pending handle FAILED once its deadline has passed; True if this call did it."""
        if self.state is TransferState.PENDING and (time.monotonic() if now is None else now) > self.deadline:
            return self.settle(
                TransferState.FAILED, f"not done within its deadline ({self.deadline_s:.1f} s)"
            )
        return False

    @property
    def deadline_s(self) -> float:
        return self.deadline - self.started


class KVTransport(abc.ABC):
    """A node's end of the KV transfer fabric; see the module docstring for the protocol."""

    name: str  # the backend's name in create_transport

    @abc.abstractmethod
    def register(self, kv_layers: list[torch.Tensor]) -> None:
        """Register the node's whole paged pool, once; ValueError if it is not a well-formed pool."""

    @abc.abstractmethod
    def local_descriptor(self) -> bytes:
        """What a peer passes to connect() to reach this node; ValueError before register()."""

    @abc.abstractmethod
    def connect(self, peer_descriptor: bytes, head_slices: bool = False) -> PeerId:
        """Open (or reuse) a path to the peer; TransferError if it is unreachable or its layout incompatible.
        head_slices: the writes will be HeadSlices, so the two pools' numbers of KV heads may differ."""

    @abc.abstractmethod
    def write_blocks(
        self,
        peer: PeerId,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        notify: bytes | None = None,
        heads: HeadSlice | None = None,
    ) -> TransferHandle:
        """Start writing local blocks src_blocks[i] of layer (only `heads`, if given) into the peer's dst_blocks[i];
        returns at once."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """The write's state now; never blocks."""

    @abc.abstractmethod
    def notifications(self) -> list[tuple[PeerId, bytes]]:
        """Notify payloads of the writes that landed here since the last call; never blocks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; idempotent and bounded in time."""

    def wait(self, handles: Iterable[TransferHandle], timeout_s: float) -> bool:
        """Poll until every handle settles: True if all are DONE, False if any FAILED.

        Raises TransferTimeout if some are still pending after timeout_s seconds. Sleeps between polls, starting
        at 50 us and doubling up to 2 ms, so short waits stay short without spinning a core.
        """
        pending = list(handles)
        deadline = time.monotonic() + timeout_s
        nap = 50e-6
        failed = False
        while True:
            still_pending = []
            for handle in pending:
                state = self.poll(handle)
                if state is TransferState.PENDING:
                    still_pending.append(handle)
                elif state is TransferState.FAILED:
                    failed = True
            pending = still_pending
            if not pending:
                return not failed
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"{len(pending)} KV write(s) still pending after {timeout_s:.3f} s")
            time.sleep(nap)
            nap = min(nap * 2, 2e-3)

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_write(
    local: KVLayout,
    peer: KVLayout,
    layer: int,
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
    notify: bytes | None,
    heads: HeadSlice | None = None,
) -> tuple[list[int], list[int]]:
    """Validate write_blocks arguments (ValueError naming the problem); returns the block ids as int lists."""
    if heads is None:
        if local.num_kv_heads != peer.num_kv_heads:
            raise ValueError(
                f"whole blocks of {local.num_kv_heads} KV heads cannot go into blocks of {peer.num_kv_heads}: "
                "write a HeadSlice"
            )
    elif isinstance(heads, HeadSlice):
        heads.check(local.num_kv_heads, peer.num_kv_heads)
    else:
        raise ValueError(f"heads must be None or a HeadSlice, got {heads!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < local.num_layers:
        raise ValueError(f"layer must be an integer in [0, {local.num_layers}), got {layer!r}")
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    src = _block_ids("source", src_blocks, local.num_blocks)
    dst = _block_ids("destination", dst_blocks, peer.num_blocks)
    if len(set(dst)) != len(dst):
        raise ValueError("destination blocks repeat: each destination block can be written once per call")
    if notify is not None:
        if not isinstance(notify, bytes) or not notify:
            raise ValueError(f"notify must be None or non-empty bytes, got {notify!r}")
        if len(notify) > MAX_NOTIFY_BYTES:
            raise ValueError(f"notify is {len(notify)} bytes; at most {MAX_NOTIFY_BYTES} are allowed")
    return src, dst


def _block_ids(side: str, blocks: Sequence[int], num_blocks: int) -> list[int]:
    ids = []
    for block in blocks:
        try:
            block_id = operator.index(block)  # ints and numpy integers, not floats
        except TypeError:
            raise ValueError(f"{side} block {block!r} is not an integer") from None
        if isinstance(block, bool) or not 0 <= block_id < num_blocks:
            raise ValueError(f"{side} block {block!r} is out of range [0, {num_blocks})")
        ids.append(block_id)
    return ids
