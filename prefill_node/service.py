"""The prefill node's gRPC service: the engine in its prefill role, streaming KV into a decode node's blocks.

A request's life cycle on this node:
1. Prefill arrives from the router with the prompt, the chosen decode node's transport descriptor and the block ids
   that node reserved. The engine validates the request (INVALID_ARGUMENT); the transport connects to the decode
   node (once per peer; UNAVAILABLE if it cannot). When the decode node's prefix cache holds more of the prompt
   than this node's, those blocks are copied from there instead of computed (prefill_node/prefix_pull.py).
2. The engine computes the prompt in chunks. Right after each layer's KV of a chunk is stored, the layer hook issues
   a one-sided write of those blocks into the matching reserved blocks, so transfer overlaps the remaining layers.
   Prompts shorter than `one_piece_below` tokens skip this: their whole KV goes in step 3, in one write per layer
   (Splitwise sends prompts under 512 tokens in one piece: per-layer writes would cost more than they hide).
3. The first token is sampled. Whatever step 2 did not send (blocks served from the prefix cache, or the whole KV
   of a short prompt) is sent now. Blocks the decode node holds already (its own prefix cache, `decode_cached_blocks`:
   the previous turn of a conversation decoded there) are never sent. When every write has completed (bounded by the request's deadline),
   `kv-done:<request id>` is sent, the blocks are released, and the first token goes back to the router with this
   node's charges (cluster/power/accounting.py: its share of the steps that computed the prompt, and the transfer wait).
4. On a failed or late transfer, or when the router cancels, the request is aborted here and its blocks freed; the
   router frees the decode side and retries elsewhere. A failure the decode peer caused (unreachable, refused, gone
   mid-transfer, not taking writes before the deadline) says so in the status's trailing metadata
   (cluster/failed_side.py), so the router excludes that decode node and keeps this one. A transfer that did not end
   with `kv-done` ends with `kv-fence:<request id>` once its issued writes settled: the decode node then knows no
   write of it can still land, and frees its blocks at once (after a failed write: when its quarantine ends).
   Abort answers whether a transfer of the request started here (`found`) and ends its Prefill call; if none
   started, none will: a Prefill of that id arriving later is refused, so the router may tell the decode node to
   free the blocks at once.
While draining (SIGTERM), new Prefill calls answer UNAVAILABLE; in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import INVALID_SPAN, Span

from cluster import tracing
from cluster.failed_side import Side, failed_side_metadata
from cluster.grpc_util import abort_with
from cluster.kv_peers import KVPeers, PeerUnreachable
from cluster.node.rank_kv import RankedKV, RankWrite
from cluster.node.recent_ids import RecentIds
from cluster.power.accounting import ledger_of
from cluster.proto_convert import (
    charges_to_proto,
    finish_to_proto,
    logprob_to_proto,
    prompt_logprobs_to_proto,
)
from cluster.sampling_proto import sampling_from_proto
from engine.async_engine import AsyncEngine
from engine.engine import KVHandoff, KVLayerWrite, LLMEngine, RequestOutput
from engine.errors import EngineError
from engine.outputs import KVStepPlan
from engine.sequence import FinishReason
from kvtransfer.base import TransferError, TransferState
from kvtransfer.descriptor import NodeDescriptor
from kvtransfer.notifications import kv_done, kv_fence
from prefill_node.prefix_pull import DEFAULT_QUARANTINE_S, PrefixPull
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import cluster_pb2_grpc
from splitserve.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

TRANSFER_POLL_S = 0.001
FENCE_POLL_S = 0.005  # how often an abandoned transfer's last writes are checked before its fence is sent


class TransferFailed(Exception):
    """The KV transfer failed; `side` is the node that caused it."""

    def __init__(self, message: str, side: Side = "decode") -> None:
        super().__init__(message)
        self.side: Side = side


@dataclass(slots=True)
class _Target:
    """Where one request's KV goes, and the writes issued for it so far."""

    peer: object
    dst_blocks: list[int]
    layer_wise: bool  # stream each layer as it is computed, or send everything once the prompt is done
    # Set when the decode node publishes ranks (cluster/node/rank_kv.py): every rank writes the heads it holds to the
    # decode ranks holding them; `peer` is then that node's id, and `handles` stays empty.
    rank_to_rank: bool = False
    skip: int = 0  # leading blocks the decode node holds already (its prefix cache): never written
    handles: list[object] = field(default_factory=list)
    error: str | None = None
    span: Span = (
        INVALID_SPAN  # the request's "prefill" span (no-op when tracing is off): writes are its events
    )
    compute_started_ns: int | None = None  # wall clock when the engine stored the request's first layer
    first_write_at: float | None = None  # monotonic time the first write was issued (the transfer's start)
    bytes_written: int = 0
    transfer_seconds: float = 0.0  # first write issued -> last write landed; set once every write completed
    done_sent: bool = False  # the kv-done notification was issued: the decode node needs no fence
    call: asyncio.Task[object] | None = (
        None  # the Prefill call serving it: Abort ends it (its finally fences)
    )


class PrefillNodeService(cluster_pb2_grpc.PrefillNodeServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        transport,
        block_size: int,
        one_piece_below: int = 512,
        cluster_token: str | None = None,
    ) -> None:
        self.engine = engine
        self.one_piece_below = one_piece_below
        self.transport = transport
        self.block_size = block_size
        self.accepting = True
        self.in_flight = 0
        self._targets: dict[str, _Target] = {}
        self._peers = KVPeers(transport)
        # Requests whose transfer started here (they end it with kv-done or a fence), and requests aborted before
        # theirs started (a Prefill of theirs arriving late is refused).
        self._started = RecentIds()
        self._refused = RecentIds()
        self._background: set[asyncio.Task[None]] = (
            set()
        )  # transfers being ended (fences), referenced until done
        self.charges = ledger_of(engine)
        # Told (seconds, bytes, rank to rank?) of each completed transfer; the node's metrics set it.
        self.on_kv_transfer: Callable[[float, int, bool], None] | None = None
        # This node's ranks and their transports (cluster/node/rank_kv.py); None with --no-kv-rank-to-rank.
        self.ranks: RankedKV | None = getattr(transport, "ranks", None)
        self._rank_peers: dict[bytes, str] = {}  # decode descriptors the ranks are connected to -> peer key
        self._step_plan: list[RankWrite] = []  # this step's rank-to-rank writes (engine thread)
        engine.engine.set_kv_layer_hook(
            self._on_layer_stored, self._plan_rank_writes if self.ranks is not None else None
        )
        quarantine_s = float(getattr(transport, "transfer_timeout_s", DEFAULT_QUARANTINE_S))
        self.prefix_pull = PrefixPull(engine, transport, cluster_token, quarantine_s)

    async def start(self) -> None:
        await self.prefix_pull.start()

    async def stop(self) -> None:
        await self.prefix_pull.stop()

    @property
    def pending_work(self) -> int:
        """Prefill calls not answered yet (computing, or waiting for their KV to land): a draining node waits."""
        return self.in_flight

    async def Prefill(
        self, request: cpb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> cpb.PrefillResponse:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill node is draining")
        rid, prompt, prior = (
            request.request_id,
            list(request.prompt_token_ids),
            list(request.prior_output_token_ids),
        )
        deadline = time.monotonic() + (request.deadline_seconds or 60.0)
        needed = -(-(len(prompt) + len(prior)) // self.block_size)
        if len(request.decode_block_ids) < needed:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.decode_block_ids)} decode blocks reserved, the prompt needs {needed}",
            )
        if request.decode_cached_blocks >= needed:  # the last block always travels: kv-done rides on it
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"decode_cached_blocks {request.decode_cached_blocks} must be below the prompt's {needed} blocks",
            )
        self.in_flight += 1
        started, started_ns = time.monotonic(), time.time_ns()
        span = tracing.span_from_grpc(
            "prefill", context, {"splitserve.request_id": rid, "splitserve.prompt_tokens": len(prompt)}
        )
        try:
            params = sampling_from_proto(request.sampling)
            await self.engine.prepare(params)  # compiles an output constraint off the engine thread
            peer, rank_to_rank = await self._connect(request.decode_transport_descriptor)
            layer_wise = len(prompt) + len(prior) >= self.one_piece_below
            target = _Target(
                peer,
                list(request.decode_block_ids[:needed]),
                layer_wise,
                rank_to_rank=rank_to_rank,
                skip=request.decode_cached_blocks,
                span=span,
                call=asyncio.current_task(),
            )
            if rid in self._refused:  # the router gave up on it and told the decode node nothing was written
                raise TransferFailed("the request was aborted before its transfer started", "prefill")
            self._targets[rid] = target
            self._started.add(rid)
            pulled = await self.prefix_pull.pull(rid, prompt + prior, request, deadline)
            stream = await self.engine.generate(rid, prompt, params, prior or None)
            try:
                out = await asyncio.wait_for(_last_output(stream), max(0.0, deadline - time.monotonic()))
            except TimeoutError as exc:  # this node did not compute the prompt in time
                raise TransferFailed("the prompt was not computed before the deadline", "prefill") from exc
            finally:
                stream.close()
            computed = time.monotonic()
            _trace_queue_and_compute(span, self._targets[rid], time.time_ns())
            if out.finish_reason == FinishReason.PREFILL_DONE:
                assert out.kv is not None  # the engine attaches the hand-over to every PREFILL_DONE output
                if self.charges is not None:
                    self.charges.begin_transfer(rid)
                with tracing.start_span("kv_transfer", span, {"splitserve.layer_wise": layer_wise}):
                    await self._complete_transfer(rid, out, out.kv, deadline)
            return cpb.PrefillResponse(
                first_token=_first_token(out),
                first_text=out.new_text,
                cached_prompt_tokens=out.num_cached_prompt_tokens,
                compute_seconds=computed - started,
                transfer_wait_seconds=time.monotonic() - computed,
                finish_reason=finish_to_proto(
                    out.finish_reason if out.finish_reason != FinishReason.PREFILL_DONE else None
                ),
                charges=charges_to_proto(self.charges.take(rid)) if self.charges is not None else None,
                kv_transfer_seconds=target.transfer_seconds,
                kv_transfer_bytes=target.bytes_written,
                queue_seconds=_queued_s(target, started_ns),
                prompt_logprobs=prompt_logprobs_to_proto(out),
                imported_blocks=pulled.blocks,
                imported_bytes=pulled.bytes,
            )
        except EngineError as exc:
            tracing.mark_failed(span, str(exc))
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc
        except TransferFailed as exc:
            tracing.mark_failed(span, str(exc))
            if exc.side == "decode":  # the next request reconnects: a broken path is not reused
                self._peers.forget(request.decode_transport_descriptor)
                self._rank_peers.pop(request.decode_transport_descriptor, None)
            context.set_trailing_metadata(failed_side_metadata(exc.side))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer for {rid!r} failed: {exc}")
            raise AssertionError("unreachable") from exc
        finally:
            self.in_flight -= 1
            unfinished = self._targets.pop(rid, None)
            if self.charges is not None:
                self.charges.discard(rid)
            # In the background: a second cancel of this call must not stop it (the decode node would then wait out
            # its quarantine), and the fence waits for the writes already issued.
            self._in_background(self._end_transfer(rid, unfinished))
            span.end()

    async def Abort(self, request: cpb.AbortRequest, context: grpc.aio.ServicerContext) -> cpb.AbortResponse:
        rid = request.request_id
        found = rid in self._started
        if not found:
            self._refused.add(rid)
        target = self._targets.get(rid)
        if target is not None and target.call is not None:
            # Do not count on the router's cancel reaching the call: ending it here is what sends the fence.
            target.call.cancel()
        await self.engine.call(lambda e: _forget(e, rid))
        return cpb.AbortResponse(found=found)

    async def _end_transfer(self, rid: str, target: _Target | None) -> None:
        """Free rid here. A transfer that did not end with kv-done ends with a fence (`kv-fence:<rid>`), sent once
        every write issued for rid has settled: backends that do not keep a peer's writes in order (NIXL) announce
        each write as it lands, so only then can nothing of rid land after the fence. A failed write may still
        land until its connection is torn down: no fence then, the decode node's quarantine covers it."""
        if target is not None and target.rank_to_rank:
            await self._end_rank_transfer(rid, target)
            return
        try:
            # On the engine thread, between steps: no layer hook issues a write of rid after this.
            issued = await self.engine.call(lambda e: _forget_listing_writes(e, rid, target))
        except EngineError:  # the engine stopped: so did its writes; the quarantine covers the rest
            return
        if target is None or issued is None:
            return
        while any(
            self.transport.poll(h) == TransferState.PENDING for h in issued
        ):  # bounded by their deadlines
            await asyncio.sleep(FENCE_POLL_S)
        if any(self.transport.poll(h) == TransferState.FAILED for h in issued):
            return
        try:
            self.transport.write_blocks(target.peer, 0, [], [], kv_fence(rid))
        except Exception as exc:  # the transport's own error types vary by backend; the quarantine covers it
            logger.info(
                "no kv-fence for %s (its decode node keeps the blocks until its quarantine ends): %s",
                rid,
                exc,
            )

    async def _end_rank_transfer(self, rid: str, target: _Target) -> None:
        """_end_transfer, rank to rank: each rank fences on its own connection, once every rank's writes of rid
        settled and none failed (the decode node frees the blocks once every route's fence is in)."""
        ranks = self.ranks
        assert ranks is not None
        try:
            await self.engine.call(lambda e: _forget(e, rid))  # between steps: no plan names rid after this
        except EngineError:
            return
        try:
            if not target.done_sent:
                while (state := (await ranks.off_loop(ranks.state, rid))[0]) is TransferState.PENDING:
                    await asyncio.sleep(FENCE_POLL_S)  # bounded by the writes' deadlines
                if state is TransferState.DONE:
                    await ranks.off_loop(ranks.write, str(target.peer), rid, [0], [], [], kv_fence(rid))
        finally:
            await ranks.off_loop(ranks.forget, rid)

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- transfer -------------------------------------------------------------------------------------------------

    async def _connect(self, descriptor: bytes) -> tuple[object, bool]:
        """The decode node's peer id (or, rank to rank, its node id), and whether the ranks write to its ranks."""
        ranks = self.ranks
        if ranks is not None:
            key = self._rank_peers.get(descriptor)
            if key is not None:
                return key, True
            try:
                peer = NodeDescriptor.from_bytes(descriptor)
            except TransferError:
                peer = None  # the whole-heads transport's connect says what is wrong with it
            if peer is not None and ranks.serves(peer):
                try:
                    key = await asyncio.to_thread(ranks.connect, peer)
                except TransferError as exc:
                    raise TransferFailed(f"cannot connect to the decode node's ranks: {exc}") from exc
                self._rank_peers[descriptor] = key
                return key, True
        try:
            return await self._peers.connect(descriptor), False
        except PeerUnreachable as exc:
            raise TransferFailed(f"cannot connect to the decode node: {exc}") from exc

    def _blocks_to_send(self, target: _Target, w: KVLayerWrite) -> tuple[list[int], list[int]] | None:
        """(src, dst) of the blocks a step wrote for a layer-wise target, less those the decode node holds."""
        if target.error is not None or not target.layer_wise:
            return None
        first = w.start // self.block_size
        drop = max(0, target.skip - first)  # blocks the decode node holds already
        if drop >= len(w.block_ids):
            return None
        return w.block_ids[drop:], target.dst_blocks[first + drop : first + len(w.block_ids)]

    def _plan_rank_writes(self, writes: list[KVLayerWrite]) -> KVStepPlan:
        """Engine thread, before each step: the blocks every rank writes to its peer ranks after each layer (the
        engine hands the plan to the worker ranks with the step; rank 0 runs it from _on_layer_stored), and the
        requests whose KV need not be mirrored into rank 0's whole-heads pool: all but those that leave through
        it (a whole-path peer's; cached blocks it is sent later are gathered then, _complete_transfer)."""
        plan = []
        for w in writes:
            target = self._targets.get(w.request_id)
            if target is None or not target.rank_to_rank:
                continue
            blocks = self._blocks_to_send(target, w)
            if blocks is not None:
                plan.append(RankWrite(str(target.peer), w.request_id, *blocks))
                if target.first_write_at is None:
                    target.first_write_at = time.monotonic()
        self._step_plan = plan
        # Only a peer without ranks is sent KV from the whole-heads pool.
        unmirrored = frozenset(
            w.request_id
            for w in writes
            if (target := self._targets.get(w.request_id)) is None or target.rank_to_rank
        )
        return KVStepPlan(plan or None, unmirrored)

    def _on_layer_stored(self, layer: int, writes: list[KVLayerWrite]) -> None:
        """Engine thread, right after layer `layer` stored its new KV: ship the touched blocks of our requests."""
        for w in writes:
            target = self._targets.get(w.request_id)
            if target is not None and target.compute_started_ns is None:
                target.compute_started_ns = time.time_ns()  # its first layer is stored: it has left the queue
            if target is None or target.rank_to_rank:
                continue
            blocks = self._blocks_to_send(target, w)
            if blocks is not None:
                self._write(target, layer, *blocks)
        if self._step_plan and self.ranks is not None:
            self.ranks.local.on_layer_stored(layer, self._step_plan)

    def _write(
        self, target: _Target, layer: int, src: list[int], dst: list[int], notify: bytes | None = None
    ) -> None:
        try:
            handle = self.transport.write_blocks(target.peer, layer, src, dst, notify)
        except Exception as exc:
            target.error = str(exc) or type(exc).__name__
            return
        target.handles.append(handle)
        if (
            target.span.is_recording()
        ):  # one event per layer written (or rewritten, for the kv-done notification)
            target.span.add_event("kv_write", {"splitserve.layer": layer, "splitserve.blocks": len(src)})
        target.bytes_written += handle.num_bytes
        if target.first_write_at is None:
            target.first_write_at = handle.started

    def _unsent_blocks(self, target: _Target, out: RequestOutput, kv: KVHandoff) -> int:
        """Leading blocks the layer hook did not send. Layer-wise: only this node's prefix-cache hits (an earlier
        request computed them; the hook never saw them). One piece: every block. (Less target.skip: the blocks
        the decode node holds already.)"""
        if not target.layer_wise:
            return len(kv.block_ids)
        return -(-out.num_cached_prompt_tokens // self.block_size)

    async def _complete_transfer(self, rid: str, out: RequestOutput, kv: KVHandoff, deadline: float) -> None:
        target = self._targets[rid]
        if target.rank_to_rank:
            await self._complete_rank_transfer(rid, out, kv, deadline)
            return
        unsent = self._unsent_blocks(target, out, kv)
        if unsent > target.skip:
            src, dst = kv.block_ids[target.skip : unsent], target.dst_blocks[target.skip : unsent]
            # Cached blocks another request computed may not be in the whole-heads pool (_plan_rank_writes).
            cached = kv.block_ids[target.skip : out.num_cached_prompt_tokens // self.block_size]

            def send_unsent(engine: LLMEngine) -> None:
                if self.ranks is not None and cached:
                    engine.export_blocks(cached)
                for layer in range(len(kv.kv_layers)):
                    self._write(target, layer, src, dst)

            await self.engine.call(send_unsent)
        await self._wait(target, deadline)
        # Every write landed: the notification rides on a rewrite of one block, so it arrives after the data. The
        # last block: the decode node never shares it (a shared cached block must not be written, even with the
        # same values, while other requests read it).
        last, tail = len(kv.kv_layers) - 1, len(target.dst_blocks) - 1  # dst_blocks: the prompt's blocks
        await self.engine.call(
            lambda _e: self._write(
                target, last, kv.block_ids[tail : tail + 1], target.dst_blocks[tail:], kv_done(rid)
            )
        )
        target.done_sent = target.error is None
        await self._wait(target, deadline)
        self._transfer_done(target)

    def _transfer_done(self, target: _Target) -> None:
        """Every write landed: time the transfer (first write issued -> now) and tell the node's metrics."""
        if target.first_write_at is not None:
            target.transfer_seconds = time.monotonic() - target.first_write_at
            if self.on_kv_transfer is not None:
                self.on_kv_transfer(target.transfer_seconds, target.bytes_written, target.rank_to_rank)

    async def _complete_rank_transfer(
        self, rid: str, out: RequestOutput, kv: KVHandoff, deadline: float
    ) -> None:
        """_complete_transfer, rank to rank: every rank sends its heads of the unsent blocks, and, once every
        rank's writes landed, its own kv-done along each route (the decode node admits once every route's is in)."""
        ranks, target = self.ranks, self._targets[rid]
        assert ranks is not None  # rank_to_rank targets exist only then
        key, layers = str(target.peer), list(range(len(kv.kv_layers)))
        unsent = self._unsent_blocks(target, out, kv)
        if unsent > target.skip:
            src, dst = kv.block_ids[target.skip : unsent], target.dst_blocks[target.skip : unsent]
            await self.engine.call(lambda _e: ranks.write(key, rid, layers, src, dst))
            if target.first_write_at is None:
                target.first_write_at = time.monotonic()
        await self._wait_ranks(rid, deadline)
        last, tail = layers[-1], len(target.dst_blocks) - 1  # the last block: see _complete_transfer
        await self.engine.call(
            lambda _e: ranks.write(
                key, rid, [last], kv.block_ids[tail : tail + 1], target.dst_blocks[tail:], kv_done(rid)
            )
        )
        target.done_sent = True
        target.bytes_written = await self._wait_ranks(rid, deadline)
        self._transfer_done(target)

    async def _wait_ranks(self, rid: str, deadline: float) -> int:
        """Until every rank's writes of rid landed (their bytes); TransferFailed if one failed or time ran out."""
        assert self.ranks is not None
        while True:
            state, error, sent = await self.ranks.off_loop(self.ranks.state, rid)
            if state is TransferState.FAILED:
                raise TransferFailed(f"a KV write failed: {error}")
            if state is TransferState.DONE:
                return sent
            if time.monotonic() > deadline:
                raise TransferFailed("the decode node did not take every write before the deadline")
            await asyncio.sleep(TRANSFER_POLL_S)

    async def _wait(self, target: _Target, deadline: float) -> None:
        while True:
            if target.error is not None:
                raise TransferFailed(target.error)
            states = [self.transport.poll(h) for h in target.handles]
            if any(s == TransferState.FAILED for s in states):
                failed = next(
                    h for h, s in zip(target.handles, states, strict=True) if s == TransferState.FAILED
                )
                raise TransferFailed(
                    f"a KV write failed: {getattr(failed, 'error', None) or 'decode node gone?'}"
                )
            if all(s == TransferState.DONE for s in states):
                target.handles.clear()
                return
            if time.monotonic() > deadline:
                raise TransferFailed("the decode node did not take every write before the deadline")
            await asyncio.sleep(TRANSFER_POLL_S)


async def _last_output(stream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None:
        raise TransferFailed("the engine produced no output", "prefill")
    return last


def _trace_queue_and_compute(span: Span, target: _Target, computed_ns: int) -> None:
    """The request's wait in the engine's queue and its prompt computation, as child spans of "prefill"; the queue
    ends when the first layer's KV is stored (the engine reports nothing earlier), so it includes that layer."""
    start_ns = getattr(span, "start_time", None)  # SDK spans only; a no-op span records nothing anyway
    if not span.is_recording() or start_ns is None:
        return
    compute_ns = target.compute_started_ns or start_ns
    tracing.start_span("queue", span, start_time_ns=start_ns).end(end_time=compute_ns)
    tracing.start_span("compute", span, start_time_ns=compute_ns).end(end_time=computed_ns)


def _queued_s(target: _Target, started_ns: int) -> float:
    """Seconds from the request's arrival to its first layer being computed (0 if the engine reported none)."""
    if target.compute_started_ns is None:
        return 0.0
    return max(0.0, (target.compute_started_ns - started_ns) / 1e9)


def _first_token(out: RequestOutput) -> pb.TokenLogprob:
    token = out.new_token_ids[0]
    if out.new_logprobs:
        return logprob_to_proto(out.new_logprobs[0])
    return pb.TokenLogprob(token_id=token)


def _forget_listing_writes(engine, rid: str, target: _Target | None) -> list[object] | None:
    """Engine thread: free rid, and list the writes its decode node may still receive (None: it needs no fence)."""
    _forget(engine, rid)
    if target is None or target.done_sent:
        return None
    return list(target.handles)


def _forget(engine, rid: str) -> None:
    """Free whatever the engine still holds for rid: a handed-over request's blocks, or a running one."""
    try:
        engine.release(rid)
    except EngineError:
        engine.abort(rid)
