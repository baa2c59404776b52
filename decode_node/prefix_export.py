"""DecodeNode.SendPrefix: prefix KV this decode node holds, written back to the prefill node that lacks it.

Turn 2 of a conversation extends turn 1's prompt and answer. The decode node that decoded turn 1 caches both, so its
reservation for turn 2 shares those blocks (ReserveResponse.cached_blocks); the prefill node chosen for turn 2 may
hold turn 1's prompt only. Rather than computing the answer's tokens again, it asks the decode node for those
blocks: the decode node writes them, every layer, into blocks the prefill node took for them
(engine/prefix_import.py), through the same KV transport the other way round, and announces `kv-prefix:<request
id>` once every write completed (one peer's writes land in order, so the announcement arrives after the data).

The blocks read are pinned for as long as a write of them may still be in flight, so a reservation dropped
meanwhile cannot hand them to another request while they are read.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.kv_peers import KVPeers, PeerUnreachable
from engine import prefix_import
from engine.async_engine import AsyncEngine
from kvtransfer.base import TransferState
from kvtransfer.notifications import kv_prefix
from splitserve.v1 import cluster_pb2 as cpb

logger = logging.getLogger(__name__)

POLL_S = 0.001
MAX_DEADLINE_S = 60.0


class PrefixSendFailed(Exception):
    """The transport could not deliver the blocks (peer unreachable, a write failed or missed its deadline)."""


class PrefixExport:
    def __init__(self, engine: AsyncEngine, transport) -> None:
        self.engine = engine
        self.transport = transport
        self._peers = KVPeers(transport)
        self._unpinning: set[asyncio.Task[None]] = set()

    async def send(self, request: cpb.SendPrefixRequest) -> int:
        """Write the blocks and the announcement; the bytes written. EngineError for a request that asks for blocks
        the reservation does not hold cached, PrefixSendFailed for a transport failure."""
        rid, first, dst = request.request_id, request.first_block, list(request.prefill_block_ids)
        deadline = time.monotonic() + min(request.deadline_seconds or 10.0, MAX_DEADLINE_S)
        blocks = await self.engine.call(lambda e: prefix_import.pin(e, rid, first, len(dst)))
        handles: list[object] = []
        try:
            peer = await self._connect(request.prefill_transport_descriptor)
            layers = len(self.engine.engine.kv_layers)
            try:
                handles = [self.transport.write_blocks(peer, layer, blocks, dst) for layer in range(layers)]
            except ValueError as exc:  # the prefill node's block ids do not fit its pool
                raise PrefixSendFailed(f"bad prefill blocks: {exc}") from exc
            await self._settle(handles, deadline)
            announce = self.transport.write_blocks(peer, 0, [], [], kv_prefix(rid))
            handles.append(announce)
            await self._settle([announce], deadline)
            return sum(int(getattr(h, "num_bytes", 0)) for h in handles)
        except PrefixSendFailed:
            self._peers.forget(request.prefill_transport_descriptor)  # the next call reconnects
            raise
        finally:
            self._unpin_when_settled(blocks, handles)

    async def _connect(self, descriptor: bytes) -> object:
        try:
            return await self._peers.connect(descriptor)
        except PeerUnreachable as exc:
            raise PrefixSendFailed(f"cannot connect to the prefill node: {exc}") from exc

    async def _settle(self, handles: list[object], deadline: float) -> None:
        while True:
            states = [self.transport.poll(h) for h in handles]
            if TransferState.FAILED in states:
                failed = handles[states.index(TransferState.FAILED)]
                raise PrefixSendFailed(f"a KV write failed: {getattr(failed, 'error', None)}")
            if all(s == TransferState.DONE for s in states):
                return
            if time.monotonic() > deadline:
                raise PrefixSendFailed("the prefill node did not take every write before the deadline")
            await asyncio.sleep(POLL_S)

    def _unpin_when_settled(self, blocks: list[int], handles: list[object]) -> None:
        """Unpin now, or once every write still in flight has settled (each is bounded by its own deadline)."""

        async def unpin() -> None:
            while any(self.transport.poll(h) == TransferState.PENDING for h in handles):
                await asyncio.sleep(0.05)
            try:
                await self.engine.call(lambda e: prefix_import.unpin(e, blocks))
            except Exception as exc:  # the engine stopped: its pool goes with it
                logger.info("prefix blocks not unpinned: %s", exc)

        task = asyncio.get_running_loop().create_task(unpin())
        self._unpinning.add(task)
        task.add_done_callback(self._unpinning.discard)
