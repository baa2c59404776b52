"""The decode node's gRPC service: the engine in its decode role.

A request's life cycle on this node:
1. Reserve: the router sends the prompt's token ids and sampling parameters. The engine validates them
   (INVALID_ARGUMENT) and holds KV blocks for the prompt (RESOURCE_EXHAUSTED when short). The reservation expires
   after hold_seconds unless step 3 admits it.
2. KV arrives: the prefill node writes every layer's blocks straight into this node's pool through the KV transport,
   then sends the notification `kv-done:<request id>`, which it sends only after all of its writes completed.
3. Decode: the router passes the first token (sampled by the prefill node). Once the kv-done notification is in
   (bounded wait: UNAVAILABLE otherwise, so the router retries elsewhere), the engine admits the request and its
   tokens stream back. The first token is not sent again: the router already delivered it. The last message's
   usage carries this node's charges (cluster/power/accounting.py: its share of the steps that decoded the request).
4. The end: finishing, the router closing the stream (client cancel), Abort, or an expired reservation frees the
   request's blocks, exactly once (the engine ignores a second abort). A reservation dropped before its KV was
   complete (Abort after a failed or cancelled prefill, or KV that never arrived) is quarantined first: writes of
   its transfer may still be in flight and must not land in blocks another request already uses. The quarantine
   ends at the prefill node's `kv-fence:<request id>` (sent after its last write of the request: nothing of it
   can land later), or else after the transport's per-write deadline. An Abort with `no_kv_writes` (the router
   knows no write was issued: Prefill never started) frees at once, and an Abort that arrives before its Reserve
   makes that Reserve fail (ABORTED), so a Reserve the router cancelled on its way holds nothing.
SendPrefix (decode_node/prefix_export.py): while a reservation waits for its KV, its prefill node may ask for the
blocks this node's prefix cache shared into it, so that it need not compute them itself.
While draining (SIGTERM), Reserve answers UNAVAILABLE and admitted requests run to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from cluster import tracing
from cluster.grpc_util import abort_with
from cluster.node.rank_kv import RankedKV
from cluster.node.recent_ids import RecentIds
from cluster.power.accounting import ledger_of
from cluster.proto_convert import charged_usage, output_to_proto
from cluster.sampling_proto import sampling_from_proto
from decode_node.prefix_export import PrefixExport, PrefixSendFailed
from engine.async_engine import AsyncEngine
from engine.errors import EngineError
from kvtransfer.notifications import parse_kv_done, parse_kv_fence
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import cluster_pb2_grpc
from splitserve.v1 import inference_pb2 as pb

# How often the transport's notifications are polled; bounds the extra latency between KV landing and admission.
NOTIFICATION_POLL_S = 0.002
REAPER_INTERVAL_S = 0.1
MAX_HOLD_S = 120.0
# How long blocks of a reservation whose transfer failed stay held when no fence comes (its prefill node died, or
# the path broke): the transport's per-write deadline, after which no write of that transfer can still land.
QUARANTINE_S = 30.0


class DecodeNodeService(cluster_pb2_grpc.DecodeNodeServicer):
    def __init__(self, engine: AsyncEngine, transport, block_size: int) -> None:
        self.engine = engine
        self.transport = transport
        self.block_size = block_size
        self.accepting = True
        self._expiry: dict[str, float] = {}  # reserved, not yet admitted: request id -> monotonic deadline
        self._kv_done: dict[str, asyncio.Event] = {}
        # Set while some reservation waits for its kv-done or fence notification.
        self._awaiting_kv = asyncio.Event()
        self._quarantined: set[str] = set()  # dropped before their KV was complete: freed at their fence
        self._fenced: set[str] = set()  # reserved; their prefill node said none of their writes will follow
        self._aborted = RecentIds()  # aborted before their Reserve arrived: refused if it still comes
        self.quarantine_s = float(getattr(transport, "transfer_timeout_s", QUARANTINE_S))
        self._tasks: list[asyncio.Task[None]] = []
        self.charges = ledger_of(engine)
        self.prefix_export = PrefixExport(engine, transport)
        # This node's ranks (cluster/node/rank_kv.py; None with --no-kv-rank-to-rank): a prefill node's ranks write
        # the heads each of them holds there, and its kv-done counts once every route's has arrived.
        self.ranks: RankedKV | None = getattr(transport, "ranks", None)
        self._kv_in_ranks: set[str] = set()  # reservations whose KV came rank to rank: nothing to import

    @property
    def pending_work(self) -> int:
        """Reservations whose Decode call has not taken them over yet: a draining node waits for them too."""
        return len(self._kv_done)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll_notifications()),
            asyncio.create_task(self._reap_expired()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def Reserve(
        self, request: cpb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ReserveResponse:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode node is draining")
        rid = request.request_id
        if rid in self._expiry:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r} already holds a reservation"
            )
        if rid in self._aborted:  # the router gave up on it before this call got here
            await context.abort(grpc.StatusCode.ABORTED, f"request {rid!r} was aborted")
        prompt, prior = list(request.prompt_token_ids), list(request.prior_output_token_ids)
        span = tracing.span_from_grpc("reserve", context, {"splitserve.request_id": rid})
        # Registered before the engine reserves: if the router cancels this call meanwhile, its Abort (or else
        # the reaper) still finds the reservation and frees the blocks.
        hold = min(request.hold_seconds or 30.0, MAX_HOLD_S)
        self._expiry[rid] = time.monotonic() + hold
        self._kv_done[rid] = asyncio.Event()
        if self.ranks is not None:  # a ranks' notification of an earlier attempt must not count for this one
            self.ranks.discard_arrivals(rid)
        self._awaiting_kv.set()
        try:
            params = sampling_from_proto(request.sampling)
            await self.engine.prepare(params)  # compiles an output constraint off the engine thread
            blocks, cached = await self.engine.call(
                lambda e: (e.reserve(rid, prompt, params, prior), e.cached_blocks(rid))
            )
        except EngineError as exc:
            self._expiry.pop(rid, None)
            self._kv_done.pop(rid, None)
            self._fenced.discard(rid)
            tracing.mark_failed(span, str(exc))
            span.end()
            await abort_with(context, exc)
        span.set_attribute("splitserve.blocks", len(blocks))
        span.set_attribute("splitserve.cached_blocks", cached)
        span.end()
        return cpb.ReserveResponse(block_ids=blocks, block_size=self.block_size, cached_blocks=cached)

    async def Decode(
        self, request: cpb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id
        arrived = self._kv_done.get(rid)
        span = tracing.span_from_grpc("decode", context, {"splitserve.request_id": rid})
        if (
            arrived is None or rid not in self._expiry or rid in self._fenced
        ):  # unknown, expired, or abandoned
            tracing.mark_failed(span, "no reservation")
            span.end()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation for request {rid!r}")
            return
        try:
            await asyncio.wait_for(arrived.wait(), request.kv_wait_seconds or 30.0)
        except asyncio.CancelledError:  # the router went away before the KV was in
            self._quarantine(rid)
            span.end()
            raise
        except TimeoutError:
            self._quarantine(rid)
            tracing.mark_failed(span, "KV did not arrive in time")
            span.end()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV for request {rid!r} did not arrive in time")
        span.add_event("kv_arrived")
        self._expiry.pop(rid, None)
        self._kv_done.pop(rid, None)
        stream = self.engine.open_stream(rid)
        generation, generated = tracing.INVALID_SPAN, 0
        try:
            # The router already delivered the first token (and its logprob): only its id matters here.
            first_id = request.first_token.token_id
            in_ranks = rid in self._kv_in_ranks
            self._kv_in_ranks.discard(rid)
            try:
                await self.engine.call(lambda e: e.admit(rid, first_id, kv_in_ranks=in_ranks))
            except EngineError as exc:
                tracing.mark_failed(span, str(exc))
                await abort_with(context, exc)
            span.add_event("admitted")
            generation = tracing.start_span("generation", span)
            skipped_first = False
            async for out in stream:
                msg = output_to_proto(out)
                if out.finished and self.charges is not None:
                    msg.usage.CopyFrom(charged_usage(self.charges.take(rid)))
                if not skipped_first:  # the admit output is the first token, already delivered by the router
                    skipped_first = True
                    if not out.finished:
                        continue
                    del msg.token_ids[:], msg.logprobs[:]
                    msg.text = ""
                generated += len(msg.token_ids)
                yield msg
        finally:
            stream.close()  # aborts the request if the router went away mid-stream
            generation.set_attribute("splitserve.output_tokens", generated)
            generation.end()
            span.end()
            if self.charges is not None:
                self.charges.discard(rid)

    async def SendPrefix(
        self, request: cpb.SendPrefixRequest, context: grpc.aio.ServicerContext
    ) -> cpb.SendPrefixResponse:
        rid = request.request_id
        if rid not in self._kv_done:  # unknown, expired, admitted or dropped: its blocks are not ours to lend
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation awaiting KV for request {rid!r}")
        try:
            sent = await self.prefix_export.send(request)
        except EngineError as exc:
            await abort_with(context, exc)
        except PrefixSendFailed as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefix blocks for {rid!r} not sent: {exc}")
        return cpb.SendPrefixResponse(bytes=sent)

    async def Abort(self, request: cpb.AbortRequest, context: grpc.aio.ServicerContext) -> cpb.AbortResponse:
        rid = request.request_id
        found = rid in self._expiry
        if not found:  # its Reserve may still be on its way: refuse it then
            self._aborted.add(rid)
        if found and request.no_kv_writes:  # nothing was written into its blocks, and nothing will be
            self._fenced.add(rid)
        self._quarantine(rid)
        return cpb.AbortResponse(found=found)

    def _quarantine(self, rid: str) -> None:
        """Stop serving a reservation now, free its blocks only once no write of its transfer can still land."""
        event = self._kv_done.pop(rid, None)
        if rid not in self._expiry:
            return
        if (event is not None and event.is_set()) or rid in self._fenced:
            self._expiry[rid] = time.monotonic()
        else:
            self._expiry[rid] = time.monotonic() + self.quarantine_s
            self._quarantined.add(rid)
            self._awaiting_kv.set()  # its fence may still come

    def _fence_arrived(self, rid: str) -> None:
        """The prefill node issued its last write of rid: a quarantine can end now."""
        if rid not in self._expiry:
            return
        if rid in self._quarantined:
            self._expiry[rid] = time.monotonic()  # the reaper frees it on its next round
        else:
            self._fenced.add(rid)

    async def _drop(self, rid: str) -> None:
        self._kv_in_ranks.discard(rid)
        self._expiry.pop(rid, None)
        self._kv_done.pop(rid, None)
        self._quarantined.discard(rid)
        self._fenced.discard(rid)
        await self.engine.call(lambda e: e.abort(rid))

    async def _poll_notifications(self) -> None:
        while True:
            if not self._kv_done and not self._quarantined:
                # Nobody waits for KV: sleep until a reservation arrives rather than polling the transport 500
                # times a second, each poll taking the GIL from the engine thread in the middle of its steps.
                self._awaiting_kv.clear()
                await self._awaiting_kv.wait()
            for _peer, payload in self.transport.notifications():
                self._notified(payload)
            if self.ranks is not None:
                for _peer, payload in await self.ranks.off_loop(self.ranks.notifications):
                    self._notified(payload, in_ranks=True)
            await asyncio.sleep(NOTIFICATION_POLL_S)

    def _notified(self, payload: bytes, in_ranks: bool = False) -> None:
        """A notification the node's transport (or every one of its ranks') received."""
        done = parse_kv_done(payload)
        event = self._kv_done.get(done or "")
        if event is not None:
            if in_ranks:
                self._kv_in_ranks.add(done or "")
            event.set()
        # kv-done of a request dropped meanwhile is its last write too: it ends the quarantine like a fence.
        last = parse_kv_fence(payload) or (done if done in self._quarantined else None)
        if last is not None:
            self._fence_arrived(last)

    async def _reap_expired(self) -> None:
        while True:
            now = time.monotonic()
            for rid in [r for r, deadline in self._expiry.items() if deadline < now]:
                await self._drop(rid)
            await asyncio.sleep(REAPER_INTERVAL_S)
