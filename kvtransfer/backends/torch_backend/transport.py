"""TorchTransport: the KVTransport of the torch backend (see the package docstring for the design)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvtransfer.backends.torch_backend.pairs import (
    JOIN_TIMEOUT_S,
    InboundPair,
    Job,
    OutboundPair,
    TorchHandle,
)
from kvtransfer.backends.torch_backend.wire import DIST_ERRORS, IDLE, gloo_pair
from kvtransfer.base import (
    DEFAULT_CONNECT_TIMEOUT_S,
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

_ACCEPT_QUEUE = "kv/accept"

log = logging.getLogger(__name__)


class TorchTransport(KVTransport):
    name = "torch"

    def __init__(
        self,
        node_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        cluster_token: str | None = None,
    ) -> None:
        """host: the address peers reach this node at; its store and gloo sockets bind it alone, never every
        interface. port 0 picks a free port. cluster_token: a peer's connect request must prove it holds this
        secret (an HMAC of the request's one-time pair key; the token itself never crosses the store), and this
        node proves it to the peers it connects to; None accepts any peer."""
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        self.node_id = node_id
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._cluster_token = cluster_token
        self._seen_keys: set[str] = set()  # pair keys already accepted: a replayed request is refused
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()  # one connect at a time: it waits for the peer
        self._layout: KVLayout | None = None
        self._pool: list[torch.Tensor] = []
        self._server: Any = None  # the TCPStore this node hosts
        self._accept_thread: threading.Thread | None = None
        self._outbound: dict[PeerId, OutboundPair] = {}
        self._inbound: dict[str, InboundPair] = {}
        self._notifications: deque[tuple[PeerId, bytes]] = deque()
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------------------------

    def register(self, kv_layers: list[torch.Tensor]) -> None:
        layout = KVLayout.from_kv_layers(kv_layers)
        with self._lock:
            self._check_open()
            if self._layout is not None:
                raise ValueError("register() was already called: a transport registers one pool")
            try:
                self._server = self._host_store()
            except (*DIST_ERRORS, OSError) as exc:
                raise TransferError(f"cannot host a TCPStore on {self.host}:{self.port}: {exc}") from exc
            self._pool = list(kv_layers)
            self._layout = layout
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(self._server.port, layout), name="kv-accept", daemon=True
            )
            self._accept_thread.start()

    def _host_store(self) -> Any:
        """The TCPStore server, on `host` alone: left to itself it listens on every interface; handed a listening
        socket it serves on that one (and owns it: it closes the descriptor when it stops)."""
        listener = _listen(self.host, self.port)
        port = listener.getsockname()[1]
        fd = listener.detach()
        try:
            return dist.TCPStore(
                self.host,
                port,
                is_master=True,
                wait_for_workers=False,
                timeout=self._connect_timeout,
                master_listen_fd=fd,
            )
        except BaseException:
            os.close(fd)
            raise

    def local_descriptor(self) -> bytes:
        with self._lock:
            self._check_open()
            return NodeDescriptor(
                backend=self.name,
                node_id=self.node_id,
                layout=self._require_registered(),
                device=self._pool[0].device.type,
                endpoint=f"{self.host}:{self._server.port}",
            ).to_bytes()

    def connect(self, peer_descriptor: bytes, head_slices: bool = False) -> PeerId:
        node = NodeDescriptor.from_bytes(peer_descriptor)
        with self._connect_lock:
            with self._lock:
                self._check_open()
                check_peer(node, self.name, self.node_id, self._require_registered(), head_slices)
                peer_id = PeerId(node.node_id)
                known = self._outbound.get(peer_id)
                if known is not None and known.descriptor == peer_descriptor and known.broken is None:
                    return peer_id
                self._outbound.pop(peer_id, None)
            if known is not None:  # it broke, or the peer restarted with a new descriptor
                known.close()
            pair = self._open_pair(node, peer_descriptor, head_slices)
            with self._lock:
                if not self._closed:
                    self._outbound[peer_id] = pair
                    return peer_id
            pair.close()
            raise TransferError("the KV transport was closed while connecting")

    def _open_pair(self, node: NodeDescriptor, descriptor: bytes, head_slices: bool) -> OutboundPair:
        host, _, port = node.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(
                f"descriptor of {node.node_id!r} has no store endpoint (got {node.endpoint!r})"
            )
        try:
            # A refused connection fails here at once; TCPStore would retry past its timeout, logging stack traces.
            socket.create_connection((host, int(port)), timeout=self.connect_timeout_s).close()
        except OSError as exc:
            raise TransferError(f"KV peer {node.node_id!r} at {node.endpoint} is unreachable: {exc}") from exc
        key = f"{self.node_id}/{uuid.uuid4().hex}"
        request: dict[str, object] = {
            "key": key,
            "node_id": self.node_id,
            "layout": self._require_registered().to_json(),
            "head_slices": head_slices,
        }
        if self._cluster_token:
            request["proof"] = pair_proof(self._cluster_token, key)
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=self._connect_timeout)
            store.queue_push(_ACCEPT_QUEUE, json.dumps(request))
            store.wait([f"kv/pair/{key}/answer"], self._connect_timeout)
            answer = store.get(f"kv/pair/{key}/answer").decode()
        except DIST_ERRORS as exc:
            raise TransferError(f"KV peer {node.node_id!r} at {node.endpoint} did not answer: {exc}") from exc
        if answer != "ok":
            raise TransferError(f"KV peer {node.node_id!r} refused the connection: {answer}")
        try:
            group = gloo_pair(store, key, 0, self.host, self.connect_timeout_s)
        except DIST_ERRORS as exc:
            raise TransferError(f"cannot open a gloo pair with {node.node_id!r}: {exc}") from exc
        return OutboundPair(node, descriptor, key, store, group, self._pool)

    def _accept_loop(self, port: int, layout: KVLayout) -> None:
        try:
            store = dist.TCPStore(self.host, port, is_master=False, timeout=IDLE)
            while request := store.queue_pop(_ACCEPT_QUEUE, True):  # close() pushes an empty request
                try:
                    self._accept(store, port, layout, json.loads(request))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("KV transport %s ignored a malformed connect request: %s", self.node_id, exc)
        except DIST_ERRORS as exc:
            if not self._closed:
                log.warning("KV transport %s stopped accepting peers: %s", self.node_id, exc)

    def _accept(self, store: Any, port: int, layout: KVLayout, request: dict[str, Any]) -> None:
        key, peer = str(request["key"]), PeerId(str(request["node_id"]))
        peer_layout = KVLayout.from_json(str(request["layout"]))
        head_slices = request.get("head_slices") is True  # each write then checks its heads fit (pairs.py)
        reason = self._refusal(key, request) or layout.compatible_with(peer_layout, head_slices)
        store.set(f"kv/pair/{key}/answer", "ok" if reason is None else reason)
        if reason is not None or self._closed:
            return
        try:
            pair_store = dist.TCPStore(self.host, port, is_master=False, timeout=IDLE)
            group = gloo_pair(pair_store, key, 1, self.host, self.connect_timeout_s)
        except DIST_ERRORS as exc:
            log.warning("KV peer %s did not complete its connection: %s", peer, exc)
            return
        with self._lock:  # the pair is listed before its threads can retire it
            if self._closed:
                return  # dropping the group closes its sockets: the writer sees the connection end
            self._inbound[key] = InboundPair(
                peer,
                key,
                pair_store,
                group,
                self._pool,
                layout,
                self.transfer_timeout_s,
                on_notify=lambda peer, payload: self._notifications.append((peer, payload)),
                on_end=self._retire,
            )

    def _refusal(self, key: str, request: dict[str, Any]) -> str | None:
        """Why a connect request is refused before its layout is even read: no valid proof of the cluster token,
        or a pair key seen before (a request replayed by someone who read the store); None when it may go on."""
        if not self._cluster_token:
            return None
        if not hmac.compare_digest(str(request.get("proof", "")), pair_proof(self._cluster_token, key)):
            log.warning("KV transport %s refused a peer without the cluster token", self.node_id)
            return "unauthorized: the connect request does not carry the cluster token"
        if key in self._seen_keys:
            return "unauthorized: this pair key was used before"
        self._seen_keys.add(key)
        return None

    def _retire(self, pair: InboundPair) -> None:
        with self._lock:
            if self._inbound.pop(pair.key, None) is None or self._server is None:
                return
            server = self._server
        with contextlib.suppress(*DIST_ERRORS):  # wakes the receiver thread if the watcher noticed first
            server.queue_push(pair.headers_key, b"")

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
            pair = self._outbound.get(peer)
        if pair is None:
            raise TransferError(f"not connected to KV peer {peer!r}")
        src, dst = check_write(layout, pair.node.layout, layer, src_blocks, dst_blocks, notify, heads)
        now = time.monotonic()
        handle = TorchHandle(
            peer, layer, layout.write_bytes(len(src), heads), now + self.transfer_timeout_s, started=now
        )
        pair.submit(Job(handle, src, dst, notify, heads))
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        if not isinstance(handle, TorchHandle):
            raise ValueError(f"{handle!r} was not returned by a torch transport")
        handle.expire_if_late()
        return handle.state

    def notifications(self) -> list[tuple[PeerId, bytes]]:
        received = []
        while self._notifications:
            received.append(self._notifications.popleft())
        return received

    # -- tear-down ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outbound, self._outbound = list(self._outbound.values()), {}
            inbound, self._inbound = list(self._inbound.values()), {}
            server = self._server
        for pair in outbound:
            pair.close()
        if server is not None:
            for queue_key in [_ACCEPT_QUEUE, *(pair.headers_key for pair in inbound)]:
                with contextlib.suppress(*DIST_ERRORS):
                    server.queue_push(queue_key, b"")
        for inbound_pair in inbound:
            inbound_pair.link.close()
        if self._accept_thread is not None:
            self._accept_thread.join(JOIN_TIMEOUT_S)
        for inbound_pair in inbound:
            inbound_pair.join(JOIN_TIMEOUT_S)
        with self._lock:
            self._server = None  # stops the store server
            self._pool = []

    # -- helpers ------------------------------------------------------------------------------------------------

    @property
    def _connect_timeout(self) -> timedelta:
        return timedelta(seconds=self.connect_timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the KV transport is closed")

    def _require_registered(self) -> KVLayout:
        if self._layout is None:
            raise ValueError("register() the KV pool first")
        return self._layout


def pair_proof(token: str, key: str) -> str:
    """What a connect request carries to show its sender holds the cluster token: HMAC-SHA256(token, pair key)."""
    return hmac.new(token.encode(), key.encode(), hashlib.sha256).hexdigest()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` alone (IPv4 or IPv6, whichever `host` is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]"), port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener
