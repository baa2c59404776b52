"""Prefix blocks the chosen decode node holds and this prefill node lacks: copied from there, not recomputed.

When the router's Prefill says the decode node's reservation shares its first `decode_cached_blocks` blocks from
that node's prefix cache (e.g. turn 1 of the conversation, prompt and answer, decoded there) and this node's own
cache holds fewer of them, this node takes blocks for the difference (engine/prefix_import.py), asks the decode node
to write them (DecodeNode.SendPrefix, decode_node/prefix_export.py) and waits for its `kv-prefix:<request id>`
announcement. The blocks then enter this node's prefix cache, and the prompt's computation that follows starts
after them, as after any cache hit. The decode node is not sent those blocks back: they are the ones it holds.

A pull that fails in any way (the decode node refuses or is gone, the transport breaks, the time allowed passes)
costs the recompute the pull was to save, never the request. Blocks of a pull that may still receive writes are
freed only after the transport's per-write deadline, so a late write cannot land in another request's blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from cluster.node_clients import NodeClients
from engine import prefix_import
from engine.async_engine import AsyncEngine
from engine.errors import EngineError
from kvtransfer.notifications import parse_kv_prefix
from splitserve.v1 import cluster_pb2 as cpb

logger = logging.getLogger(__name__)

NOTIFICATION_POLL_S = 0.002
DEFAULT_QUARANTINE_S = 30.0  # a transport without its own per-write deadline: kvtransfer's default
MAX_PULL_S = 10.0  # at most this much of a request's deadline goes to a pull; the rest is left to recompute
# A refusal with one of these codes comes before the decode node wrote anything: the blocks can be freed at once.
NOTHING_WRITTEN = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass(frozen=True, slots=True)
class Pulled:
    blocks: int = 0
    bytes: int = 0


class PrefixPull:
    def __init__(
        self, engine: AsyncEngine, transport, cluster_token: str | None, quarantine_s: float
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.quarantine_s = quarantine_s
        self.clients = NodeClients(cluster_token)
        self._arrived: dict[str, asyncio.Event] = {}
        self._awaiting = asyncio.Event()  # set while some pull waits for its announcement
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        # Told (blocks, bytes) of each completed pull; the node's metrics (cluster/node/metrics.py) set it.
        self.on_import: Callable[[int, int], None] | None = None

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_notifications())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.clients.close()

    async def pull(
        self, rid: str, token_ids: list[int], request: cpb.PrefillRequest, deadline: float
    ) -> Pulled:
        """Bring in the decode node's cached blocks this node lacks; what came (nothing when none was needed or the
        pull failed)."""
        wanted = request.decode_cached_blocks
        if not request.decode_address or wanted == 0 or self.transport is None:
            return Pulled()
        try:
            started = await self.engine.call(lambda e: prefix_import.begin(e, rid, token_ids, wanted))
        except EngineError as exc:  # no free blocks, or an earlier pull of this id still quarantined
            logger.info("no prefix pull for %s: %s", rid, exc)
            return Pulled()
        if not started.block_ids:
            return Pulled()
        arrived = self._arrived[rid] = asyncio.Event()
        self._awaiting.set()
        budget = min(MAX_PULL_S, max(0.0, (deadline - time.monotonic()) / 2))
        committed, written = False, True
        try:
            reply = await self.clients.decode(request.decode_address).SendPrefix(
                cpb.SendPrefixRequest(
                    request_id=rid,
                    prefill_transport_descriptor=self.transport.local_descriptor(),
                    first_block=started.first_block,
                    prefill_block_ids=started.block_ids,
                    deadline_seconds=budget,
                ),
                timeout=budget,
            )
            await asyncio.wait_for(arrived.wait(), max(0.0, budget))
            # In the cache before the prompt is admitted: the engine runs calls in the order they came.
            await self.engine.call(lambda e: prefix_import.finish(e, rid, filled=True))
            committed = True
            if self.on_import is not None:
                self.on_import(len(started.block_ids), reply.bytes)
            return Pulled(len(started.block_ids), reply.bytes)
        except grpc.aio.AioRpcError as exc:
            written = exc.code() not in NOTHING_WRITTEN
            logger.info("prefix pull for %s failed (%s): computing the blocks instead", rid, exc.details())
            return Pulled()
        except TimeoutError:
            logger.info("prefix pull for %s not announced in time: computing the blocks instead", rid)
            return Pulled()
        except EngineError as exc:  # the engine stopped
            logger.info("prefix pull for %s not committed: %s", rid, exc)
            return Pulled()
        finally:
            self._arrived.pop(rid, None)
            if not committed:  # a no-op if the commit went through after all (cancelled while it ran)
                self._in_background(self._drop(rid, self.quarantine_s if written else 0.0))

    async def _drop(self, rid: str, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)  # a write of the failed pull may still land until its deadline
        try:
            await self.engine.call(lambda e: prefix_import.finish(e, rid, filled=False))
        except EngineError as exc:  # the engine stopped: its pool goes with it
            logger.info("prefix import %s not ended: %s", rid, exc)

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll_notifications(self) -> None:
        while True:
            if not self._arrived:
                self._awaiting.clear()
                await self._awaiting.wait()
            for _peer, payload in self.transport.notifications():
                event = self._arrived.get(parse_kv_prefix(payload) or "")
                if event is not None:
                    event.set()
            await asyncio.sleep(NOTIFICATION_POLL_S)
