"""NIXL KV transport: one-sided WRITEs from registered local blocks into a peer's registered blocks, over UCX.

The same calls serve DRAM and VRAM (the memory type follows the pool's device) and every UCX transport (shared
memory or TCP on one host, RDMA between hosts). The receiving node only registers its pool and reads notifications:
NIXL delivers a write's notify payload after the write's data is in place.

Descriptor lists are prepared once: at register() a local list with one descriptor per (layer, block), at connect()
one such list of the peer's pool. A write then names descriptor indices (layer * num_blocks + block) on both sides
and NIXL merges neighbouring ones, so a write costs the same however large the pools are; building descriptors per
write (initialize_xfer) re-validates every one of them and was measured several times slower.

Progress. NIXL's own progress thread polls UCX without pause (pthrDelay is fixed at 0 in its Python API): one busy
core per node even when idle, measured here. The agent runs without it, and this transport's progress thread drives
UCX instead: every 100 us while writes are in flight or notifications are arriving (and for 100 ms after), every
5 ms when idle. Each round checks the writes in flight, which is also what makes NIXL send a write's notification
(it does so when the writer observes the write complete), fails writes past their deadline, and collects arrived
notifications for notifications(). The agent is not thread-safe in this mode, so every agent call holds one lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Set before UCX loads: with system rdma-core libraries installed, UCX's EFA module segfaults at process exit.
os.environ.setdefault("UCX_MODULES", "^efa")

import numpy as np
import torch
from nixl import _bindings as nixl_bindings
from nixl._api import nixl_agent, nixl_agent_config

from kvtransfer.base import (
    DEFAULT_TRANSFER_TIMEOUT_S,
    KVTransport,
    PeerId,
    TransferError,
    TransferHandle,
    TransferState,
    check_write,
)
from kvtransfer.descriptor import NodeDescriptor, check_peer
from kvtransfer.layout import HeadSlice, KVLayout

# NIXL logs INFO lines to stdout, which would mix with a CLI's output; NIXL_LOG_LEVEL still overrides this.
if "NIXL_LOG_LEVEL" not in os.environ:
    logging.getLogger("nixl").setLevel(logging.WARNING)

# The binding's error classes (nixlBackendError, nixlRemoteDisconnectError, ...) derive from Exception only.
_NIXL_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    KeyError,
    *(
        error
        for name, error in vars(nixl_bindings).items()
        if name.startswith("nixl") and name.endswith("Error") and isinstance(error, type)
    ),
)
_LOCAL_AGENT = "NIXL_INIT_AGENT"  # prep_xfer_dlist's name for the local side of a transfer
_BUSY_NAP_S = 100e-6  # between two progress rounds while transfers are active
_IDLE_NAP_S = 5e-3  # ... and while idle
_BUSY_LINGER_S = 0.1  # how long after the last activity rounds stay frequent
_JOIN_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Peer:
    descriptor: bytes  # exactly as given to connect(), to make reconnecting idempotent
    node: NodeDescriptor
    dlist: Any  # prepared descriptor list of the peer's pool (nixl_prepped_dlist_handle)
    failed: bool = (
        False  # a write to it failed: the next connect() loads it afresh (and finds it gone or back)
    )


@dataclass(slots=True, eq=False)
class NixlHandle(TransferHandle):
    xfer: Any = None  # the NIXL transfer request while it is in flight (nixl_xfer_handle)


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(
        self, node_id: str, *, transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S, num_threads: int = 0
    ) -> None:
        """node_id names the NIXL agent and must be unique in the cluster; num_threads > 0 lets UCX use more."""
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        self.node_id = node_id
        self.transfer_timeout_s = transfer_timeout_s
        self._lock = threading.Lock()
        try:
            config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"], num_threads=num_threads)
            self._agent: Any = nixl_agent(node_id, config)
        except _NIXL_ERRORS as exc:
            raise TransferError(f"cannot start a NIXL agent with UCX: {exc}") from exc
        if "UCX" not in self._agent.backends:
            raise TransferError("NIXL has no UCX backend plugin in this installation")
        self._layout: KVLayout | None = None
        self._kv_layers: list[torch.Tensor] = []  # kept alive while registered
        self._registration: Any = None
        self._local_dlist: Any = None
        self._peers: dict[PeerId, _Peer] = {}
        self._in_flight: set[NixlHandle] = set()
        self._unreleased: list[Any] = []  # transfer requests NIXL could not cancel yet; retried at close
        self._closed = False
        self._arrived: list[tuple[PeerId, bytes]] = []  # notifications collected by the progress thread
        self._wake = threading.Event()  # cuts the progress thread's nap short: a write was just posted
        self._progress = threading.Thread(target=self._progress_loop, name=f"kv-nixl-{node_id}", daemon=True)
        self._progress.start()

    # -- set-up -------------------------------------------------------------------------------------------------

    def register(self, kv_layers: list[torch.Tensor]) -> None:
        layout = KVLayout.from_kv_layers(kv_layers)
        with self._lock:
            self._check_open()
            if self._layout is not None:
                raise ValueError("register() was already called: a transport registers one pool")
            mem_type, device_index = _memory_kind(kv_layers[0])
            addresses = [layer.data_ptr() for layer in kv_layers]
            try:
                self._registration = self._agent.register_memory(list(kv_layers))
                self._local_dlist = self._agent.prep_xfer_dlist(
                    _LOCAL_AGENT, _block_descriptors(addresses, layout, device_index), mem_type
                )
            except _NIXL_ERRORS as exc:
                raise TransferError(f"NIXL could not register the KV pool: {exc}") from exc
            self._kv_layers = list(kv_layers)
            self._layout = layout

    def local_descriptor(self) -> bytes:
        with self._lock:
            self._check_open()
            layout = self._require_registered()
            first = self._kv_layers[0]
            return NodeDescriptor(
                backend=self.name,
                node_id=self.node_id,
                layout=layout,
                device=first.device.type,
                layer_addresses=tuple(layer.data_ptr() for layer in self._kv_layers),
                device_index=_memory_kind(first)[1],
                agent_metadata=self._agent.get_agent_metadata(),
            ).to_bytes()

    def connect(self, peer_descriptor: bytes, head_slices: bool = False) -> PeerId:
        node = NodeDescriptor.from_bytes(peer_descriptor)
        with self._lock:
            self._check_open()
            check_peer(node, self.name, self.node_id, self._require_registered(), head_slices)
            if len(node.layer_addresses) != node.layout.num_layers or not node.agent_metadata:
                raise TransferError(f"descriptor of {node.node_id!r} lacks NIXL agent metadata or addresses")
            peer_id = PeerId(node.node_id)
            known = self._peers.get(peer_id)
            if known is not None and known.descriptor == peer_descriptor and not known.failed:
                return peer_id
            if known is not None:  # it failed, or restarted with new memory and endpoint
                self._forget(peer_id, known)
            self._peers[peer_id] = _Peer(peer_descriptor, node, self._load_peer(node))
            return peer_id

    def _load_peer(self, node: NodeDescriptor) -> Any:
        try:
            loaded = self._agent.add_remote_agent(node.agent_metadata)
        except _NIXL_ERRORS as exc:
            raise TransferError(f"cannot reach KV peer {node.node_id!r} through NIXL: {exc}") from exc
        name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        try:
            if name != node.node_id:
                raise TransferError(f"descriptor of {node.node_id!r} carries the NIXL agent of {name!r}")
            mem_type = "VRAM" if node.device == "cuda" else "DRAM"
            descriptors = _block_descriptors(list(node.layer_addresses), node.layout, node.device_index)
            return self._agent.prep_xfer_dlist(name, descriptors, mem_type)
        except _NIXL_ERRORS as exc:
            self._agent.remove_remote_agent(name)
            raise TransferError(f"NIXL rejected the memory of KV peer {node.node_id!r}: {exc}") from exc
        except TransferError:
            self._agent.remove_remote_agent(name)
            raise

    # -- transfers ----------------------------------------------------------------------------------------------

    def write_blocks(
        self,
        peer: PeerId,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        notify: bytes | None = None,
        heads: HeadSlice | None = None,
    ) -> TransferHandle:
        with self._lock:
            self._check_open()
            layout = self._require_registered()
            target = self._peers.get(peer)
            if target is None:
                raise TransferError(f"not connected to KV peer {peer!r}")
            src, dst = check_write(layout, target.node.layout, layer, src_blocks, dst_blocks, notify, heads)
            now = time.monotonic()
            handle = NixlHandle(
                peer, layer, layout.write_bytes(len(src), heads), now + self.transfer_timeout_s, started=now
            )
            try:
                if not src:  # nothing to copy: only the announcement
                    if notify is not None:
                        self._agent.send_notif(peer, notify)
                    handle.settle(TransferState.DONE)
                    return handle
                if heads is not None:
                    handle.xfer = self._head_slice_xfer(target.node, layer, src, dst, heads, notify)
                else:
                    local = np.asarray(src, dtype=np.int64) + layer * layout.num_blocks
                    remote = np.asarray(dst, dtype=np.int64) + layer * target.node.layout.num_blocks
                    handle.xfer = self._agent.make_prepped_xfer(
                        "WRITE",
                        self._local_dlist,
                        local.astype(np.int32),
                        target.dlist,
                        remote.astype(np.int32),
                        notify or b"",  # NIXL sends no notification for an empty message
                    )
                status = self._agent.transfer(handle.xfer)
            except _NIXL_ERRORS as exc:
                handle.settle(TransferState.FAILED, f"NIXL write to {peer!r} failed: {exc}")
                self._mark_failed(peer)
                self._release(handle)
                return handle
            self._in_flight.add(handle)
            self._update(handle, status)
            if handle.state is TransferState.PENDING:
                self._wake.set()
            return handle

    def _head_slice_xfer(
        self,
        peer: NodeDescriptor,
        layer: int,
        src: list[int],
        dst: list[int],
        heads: HeadSlice,
        notify: bytes | None,
    ) -> Any:
        """A write of some KV heads of each block: 2 x block_size runs per block on either side, listed for this
        write alone (the prepared lists hold whole blocks)."""
        local_layout = self._require_registered()
        mem_type, device_index = _memory_kind(self._kv_layers[0])
        local = _head_slice_descriptors(
            self._kv_layers[layer].data_ptr(), local_layout, src, heads.src_start, heads.count, device_index
        )
        remote = _head_slice_descriptors(
            peer.layer_addresses[layer], peer.layout, dst, heads.dst_start, heads.count, peer.device_index
        )
        peer_mem = "VRAM" if peer.device == "cuda" else "DRAM"
        return self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs(local, mem_type),
            self._agent.get_xfer_descs(remote, peer_mem),
            peer.node_id,
            notify or b"",
        )

    def poll(self, handle: TransferHandle) -> TransferState:
        if handle.state is not TransferState.PENDING:
            return handle.state
        if not isinstance(handle, NixlHandle):
            raise ValueError(f"{handle!r} was not returned by a NIXL transport")
        with self._lock:
            self._check(handle)
        return handle.state

    def _progress_loop(self) -> None:
        busy_until = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
                for handle in list(self._in_flight):
                    self._check(handle)
                arrived = self._collect_notifications()
                active = arrived or bool(self._in_flight)
            now = time.monotonic()
            if active:
                busy_until = now + _BUSY_LINGER_S
            self._wake.wait(_BUSY_NAP_S if now < busy_until else _IDLE_NAP_S)
            self._wake.clear()

    def _collect_notifications(self) -> bool:
        """Move arrived notifications to self._arrived (holding the lock); True if there were any."""
        try:
            received = self._agent.get_new_notifs()
        except _NIXL_ERRORS as exc:
            log.warning("NIXL could not read notifications: %s", exc)
            return False
        for name, messages in received.items():
            self._arrived.extend((PeerId(name), message) for message in messages)
        return bool(received)

    def _check(self, handle: NixlHandle) -> None:
        if handle.xfer is None:  # settled already (by another thread, or by close())
            return
        try:
            status = self._agent.check_xfer_state(handle.xfer)
        except _NIXL_ERRORS as exc:
            status = f"ERR ({exc})"
        self._update(handle, status)

    def _update(self, handle: NixlHandle, status: str) -> None:
        if status == "DONE":
            handle.settle(TransferState.DONE)
        elif status.startswith("ERR"):
            handle.settle(TransferState.FAILED, f"NIXL write to {handle.peer!r} failed: {status}")
        else:
            handle.expire_if_late()
        if handle.state is TransferState.FAILED:
            self._mark_failed(handle.peer)
        if handle.state is not TransferState.PENDING:
            self._release(handle)

    def _mark_failed(self, peer_id: PeerId) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.failed = True

    def _release(self, handle: NixlHandle) -> None:
        # Releasing a request that is still running asks NIXL to cancel it; if it cannot yet, retry at close().
        xfer, handle.xfer = handle.xfer, None
        self._in_flight.discard(handle)
        if xfer is None:
            return
        try:
            xfer.release()
        except _NIXL_ERRORS:
            self._unreleased.append(xfer)

    def notifications(self) -> list[tuple[PeerId, bytes]]:
        with self._lock:
            if self._closed:
                return []
            self._collect_notifications()
            arrived, self._arrived = self._arrived, []
        return arrived

    # -- tear-down ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.set()
        self._progress.join(_JOIN_TIMEOUT_S)
        with self._lock:
            for handle in list(self._in_flight):
                handle.settle(TransferState.FAILED, "the KV transport was closed")
                self._release(handle)
            for peer_id, peer in list(self._peers.items()):
                self._forget(peer_id, peer)
            for xfer in self._unreleased:
                _quietly(xfer.release)
            self._unreleased.clear()
            if self._local_dlist is not None:
                _quietly(self._local_dlist.release)
            if self._registration is not None:
                _quietly(lambda: self._agent.deregister_memory(self._registration))
            self._local_dlist = self._registration = None
            self._kv_layers = []
            self._agent = None  # the agent's destructor stops its threads and closes its endpoints

    def _forget(self, peer_id: PeerId, peer: _Peer) -> None:
        for handle in [h for h in self._in_flight if h.peer == peer_id]:
            handle.settle(TransferState.FAILED, f"the connection to {peer_id!r} was replaced or closed")
            self._release(handle)
        _quietly(peer.dlist.release)
        _quietly(lambda: self._agent.remove_remote_agent(peer_id))
        del self._peers[peer_id]

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the KV transport is closed")

    def _require_registered(self) -> KVLayout:
        if self._layout is None:
            raise ValueError("register() the KV pool first")
        return self._layout


def _memory_kind(tensor: torch.Tensor) -> tuple[str, int]:
    """NIXL memory type and device index of a pool tensor."""
    if tensor.is_cuda:
        return "VRAM", tensor.device.index or 0
    return "DRAM", 0


def _block_descriptors(addresses: list[int], layout: KVLayout, device_index: int) -> np.ndarray:
    """One (address, length, device) row per (layer, block), in layer-major order."""
    offsets = np.arange(layout.num_blocks, dtype=np.uint64) * np.uint64(layout.block_bytes)
    rows = np.empty((layout.num_layers * layout.num_blocks, 3), dtype=np.uint64)
    rows[:, 0] = (np.asarray(addresses, dtype=np.uint64)[:, None] + offsets[None, :]).reshape(-1)
    rows[:, 1] = layout.block_bytes
    rows[:, 2] = device_index
    return rows


def _head_slice_descriptors(
    address: int, layout: KVLayout, blocks: list[int], first_head: int, count: int, device_index: int
) -> np.ndarray:
    """(address, length, device) rows of heads [first_head, first_head + count) of each block of one layer tensor:
    for each block, K then V, token by token (a block is [2, block_size, heads, head_dim])."""
    row_bytes = layout.num_kv_heads * layout.head_dim * layout.element_size  # one token's K (or V), all heads
    offsets_in_block = np.arange(2 * layout.block_size, dtype=np.uint64) * np.uint64(row_bytes) + np.uint64(
        first_head * layout.head_dim * layout.element_size
    )
    block_starts = np.asarray(blocks, dtype=np.uint64) * np.uint64(layout.block_bytes) + np.uint64(address)
    rows = np.empty((len(blocks) * 2 * layout.block_size, 3), dtype=np.uint64)
    rows[:, 0] = (block_starts[:, None] + offsets_in_block[None, :]).reshape(-1)
    rows[:, 1] = count * layout.head_dim * layout.element_size
    rows[:, 2] = device_index
    return rows


def _quietly(release: Any) -> None:
    # Tear-down keeps going past NIXL errors: the peer may be gone already.
    try:
        release()
    except _NIXL_ERRORS as exc:
        log.debug("ignored NIXL error during close: %s", exc)
