"""A node's KV transport paths to its peers, by the peer's descriptor: connected once, reused, dropped when broken.

Prefill nodes connect to the decode nodes they write into; decode nodes to the prefill nodes they send prefix blocks
back to (decode_node/prefix_export.py). Connecting may block (a TCPStore handshake, a UCX wire-up), so it runs on a
worker thread. A path that failed is forgotten, so the next request connects afresh (the peer may have restarted).
"""

from __future__ import annotations

import asyncio
from typing import Any


class PeerUnreachable(Exception):
    """The transport could not connect to the peer; the text is the transport's reason."""


class KVPeers:
    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._peers: dict[bytes, object] = {}

    async def connect(self, descriptor: bytes) -> object:
        """The peer id for descriptor, connecting on first use; PeerUnreachable if the transport cannot."""
        peer = self._peers.get(descriptor)
        if peer is None:
            try:
                peer = await asyncio.to_thread(self.transport.connect, descriptor)
            except Exception as exc:  # the transport's own error types vary by backend
                raise PeerUnreachable(str(exc)) from exc
            self._peers[descriptor] = peer
        return peer

    def forget(self, descriptor: bytes) -> None:
        """Drop a path that broke: the next connect() makes a new one."""
        self._peers.pop(descriptor, None)
