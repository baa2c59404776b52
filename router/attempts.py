"""One attempt of a request on its nodes: a (prefill, decode) pair, or one colocated node.

A pair attempt: decode.Reserve -> prefill.Prefill (the KV streams between the nodes) -> the first token -> the decode
node's Decode stream. Every wait on a node is bounded (router/liveness.py): by a deadline, and by the node staying in
the cluster view, so a killed or paused node is noticed within ~2.5 s. A failure is blamed on the node that caused
it and raised as `RetryElsewhere` for the router to place the request again without that node: a Prefill that
failed because of its decode peer (cluster/failed_side.py) blames the link between the two (the decode node may be
down, or only cut off from this prefill node). An attempt that ends before its
decode node took the request over releases the reservation in the background: the prefill node is asked first
whether its transfer started, and the decode node frees the blocks at once when none did (else at the prefill
node's kv-fence, or after its quarantine).

Nodes know an attempt by its cluster-internal id (`rid` here), never by the client's request id.

Prompt logprobs (sampling.prompt_logprobs) reach the client once, on the stream's first message: from the prefill
node's answer on a pair, or the colocated node's own first message. A resumed attempt does not ask for them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TYPE_CHECKING

import grpc
from opentelemetry.trace import Span

from cluster import tracing
from cluster.failed_side import failed_side_of
from cluster.node_clients import NodeClients
from cluster.state import ClusterView, NodeState
from router.liveness import Liveness, NodeLost, NodeWatch
from router.load_tracker import LoadTracker
from router.policy import Placement
from router.relay import Relay
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from router.config import RouterConfig

# Statuses that mean "this node could not do it right now": try another one.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class RetryElsewhere(Exception):
    """A node failed; place the request again without `node_id` (tokens already delivered become prior output).
    `link` (prefill, decode): the prefill node could not write into the decode node; either end, or the path between
    them, may be at fault, so the router avoids that pair rather than the decode node alone."""

    def __init__(self, node_id: str, reason: str, link: tuple[str, str] | None = None) -> None:
        super().__init__(reason)
        self.node_id = node_id
        self.link = link


def once_delivered(sampling: pb.SamplingParameters, relay: Relay) -> pb.SamplingParameters:
    """The sampling for an attempt: a resumed one (the client already has tokens, so the first message with the prompt
    logprobs went out) does not compute the prompt logprobs again. Only a pair can resume a stream."""
    if not relay.delivered or not sampling.HasField("prompt_logprobs"):
        return sampling
    resumed = pb.SamplingParameters()
    resumed.CopyFrom(sampling)
    resumed.ClearField("prompt_logprobs")
    return resumed


class Attempts:
    """Runs attempts on nodes for the router's InferenceService; shares its clients and load tracker."""

    def __init__(
        self, config: RouterConfig, view: ClusterView, clients: NodeClients, tracker: LoadTracker
    ) -> None:
        self.config = config
        self.view = view
        self.clients = clients
        self.tracker = tracker
        self.watch = NodeWatch(view)  # ends waits on nodes that left the view
        self._background: set[asyncio.Task[None]] = set()  # best-effort aborts, referenced until they end

    def _node(self, node_id: str | None) -> NodeState:
        state = self.view.get(node_id or "")
        if state is None:
            raise RetryElsewhere(node_id or "?", f"node {node_id} left the cluster")
        return state

    async def via_pair(
        self,
        rid: str,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        placement: Placement,
        relay: Relay,
        trace: Span,
        cached: Mapping[str, int] | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """cached: per node, the prompt tokens its prefix cache holds (what it will not compute) where known."""
        prefill, decode = self._node(placement.prefill), self._node(placement.decode)
        prefill_id, decode_id = prefill.info.node_id, decode.info.node_id
        sampling = once_delivered(sampling, relay)
        decode_stub = self.clients.decode(decode.info.address)
        blocks = -(-(len(prompt) + len(relay.delivered)) // decode.info.block_size)
        blocks -= (cached or {}).get(decode_id, 0) // decode.info.block_size  # shared from its prefix cache
        self.tracker.picked(prefill_id, rid, max(len(prompt) - (cached or {}).get(prefill_id, 0), 1), 0)
        self.tracker.picked(decode_id, rid, 0, blocks)
        reserved = False
        prefill_stub = None  # set once Prefill is called: a release asks the prefill node first
        try:
            with self.watch.watch(prefill, decode) as live:
                reserved = True  # from the call on: a cancelled Reserve may still have reserved blocks
                with tracing.start_span("Reserve", trace, {"splitserve.node_id": decode_id}) as call:
                    reply = await self._call(
                        live,
                        decode,
                        decode_stub.Reserve(
                            cpb.ReserveRequest(
                                request_id=rid,
                                prompt_token_ids=prompt,
                                sampling=sampling,
                                hold_seconds=self.config.reserve_hold_s,
                                prior_output_token_ids=relay.delivered,
                            ),
                            timeout=self.config.rpc_timeout_s,
                            metadata=tracing.metadata_for(call),
                        ),
                        self.config.rpc_timeout_s,
                    )
                prefill_started = time.monotonic()
                prefill_stub = self.clients.prefill(prefill.info.address)
                with tracing.start_span("Prefill", trace, {"splitserve.node_id": prefill_id}) as call:
                    first = await self._call(
                        live,
                        prefill,
                        prefill_stub.Prefill(
                            cpb.PrefillRequest(
                                request_id=rid,
                                prompt_token_ids=prompt,
                                sampling=sampling,
                                decode_node_id=decode_id,
                                decode_transport_descriptor=decode.info.transport,
                                decode_block_ids=reply.block_ids,
                                decode_cached_blocks=reply.cached_blocks,
                                decode_address=self._pull_from(decode, reply.cached_blocks),
                                deadline_seconds=self.config.prefill_deadline_s,
                                prior_output_token_ids=relay.delivered,
                            ),
                            timeout=self.config.prefill_deadline_s + 1.0,
                            metadata=tracing.metadata_for(call),
                        ),
                        self.config.prefill_deadline_s + 1.0,
                        decode_peer=decode,
                    )
                live.release(prefill_id)  # its part is done: its health no longer matters to this request
                self.tracker.done(prefill_id, rid)
                relay.cached = max(relay.cached, first.cached_prompt_tokens)
                relay.charge(first.charges)
                relay.prefilled(prefill_started, first)
                yield relay.message(
                    rid, first.first_text, [first.first_token], first.finish_reason, first.prompt_logprobs
                )
                if first.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    return
                # From here the decode node owns the request's life: closing the stream aborts it there.
                reserved = False
                tokens = self._decode_stream(live, decode, decode_stub, rid, first.first_token, trace)
                async with contextlib.aclosing(tokens):  # a client cancel closes the Decode stream at once
                    async for msg in tokens:
                        yield relay.forward(msg)
        finally:
            self.tracker.done(prefill_id, rid)
            self.tracker.done(decode_id, rid)
            if reserved:
                self._release_in_background(prefill_stub, decode_stub, rid)

    async def _decode_stream(
        self, live: Liveness, decode: NodeState, stub, rid: str, first_token: pb.TokenLogprob, trace: Span
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The decode node's tokens after the first; a failure or a lost node becomes RetryElsewhere (the stream resumes)."""
        decode_id = decode.info.node_id
        decode_call = tracing.start_span("Decode", trace, {"splitserve.node_id": decode_id})
        stream = stub.Decode(
            cpb.DecodeRequest(request_id=rid, first_token=first_token, kv_wait_seconds=self.config.kv_wait_s),
            metadata=tracing.metadata_for(decode_call),
        )
        try:
            while True:
                async with live.bounded(decode_id, "Decode", None):
                    msg = await stream.read()
                if msg is grpc.aio.EOF:
                    return
                yield msg
        except (grpc.aio.AioRpcError, NodeLost) as exc:
            # Resume on another pair: the relay knows which tokens the client already has; they become the next
            # attempt's prior output, so nothing is repeated and the continuation is the same.
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            reason = f"decode node {decode_id} failed mid-stream: {detail}"
            tracing.mark_failed(decode_call, reason)
            raise RetryElsewhere(decode_id, reason) from exc
        finally:
            stream.cancel()
            decode_call.end()

    async def via_colocated(
        self,
        rid: str,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        placement: Placement,
        relay: Relay,
        trace: Span,
        cached: Mapping[str, int] | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        node = self._node(placement.colocated)
        node_id = node.info.node_id
        work = max(len(prompt) - (cached or {}).get(node_id, 0), 1)
        self.tracker.picked(node_id, rid, work, -(-len(prompt) // node.info.block_size))
        forwarded = pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
        call = tracing.start_span("Generate", trace, {"splitserve.node_id": node_id})
        stream = self.clients.colocated(node.info.address).Generate(
            forwarded, metadata=tracing.metadata_for(call)
        )
        started = False
        try:
            with self.watch.watch(node) as live:
                while True:
                    async with live.bounded(node_id, "Generate", None):
                        msg = await stream.read()
                    if msg is grpc.aio.EOF:
                        return
                    started = True
                    yield relay.forward(msg)
        except NodeLost as lost:
            tracing.mark_failed(call, str(lost))
            raise RetryElsewhere(node_id, f"colocated node {node_id}: {lost}") from lost
        except grpc.aio.AioRpcError as exc:
            tracing.mark_failed(call, exc.details() or exc.code().name)
            if not started and exc.code() not in RETRYABLE:
                raise
            raise RetryElsewhere(node_id, f"colocated node {node_id}: {exc.details()}") from exc
        finally:
            stream.cancel()
            call.end()
            self.tracker.done(node_id, rid)

    def _pull_from(self, decode: NodeState, cached_blocks: int) -> str:
        """The decode node's address when the prefill node may ask it for the cached blocks it lacks; else ""."""
        return decode.info.address if self.config.prefix_pull and cached_blocks else ""

    async def _call(self, live: Liveness, node: NodeState, call, timeout_s: float, decode_peer=None):
        """Await a unary RPC while the attempt's nodes stay in the view, at most timeout_s; node failures become
        RetryElsewhere, request errors reach the client unchanged. A failed Prefill (`decode_peer` given) blames the link
        to the decode node when the prefill node says its decode peer failed, and the prefill node otherwise."""
        node_id = node.info.node_id
        try:
            async with live.bounded(node_id, node.info.role, timeout_s):
                return await call
        except NodeLost as lost:
            call.cancel()
            raise RetryElsewhere(lost.node_id, str(lost)) from lost
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            reason = f"{node.info.role} node {node_id}: {exc.details()}"
            if decode_peer is not None and failed_side_of(exc) == "decode":
                decode_id = decode_peer.info.node_id
                link = (node_id, decode_id)
                raise RetryElsewhere(decode_id, f"{reason} (its decode peer failed)", link) from exc
            raise RetryElsewhere(node_id, reason) from exc

    def _release_in_background(self, prefill_stub, decode_stub, rid: str) -> None:
        """Free a reservation without holding up the retry (a paused node would hold it for the whole timeout)."""
        task = asyncio.get_running_loop().create_task(self._abort_quietly(prefill_stub, decode_stub, rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, prefill_stub, decode_stub, rid: str) -> None:
        """Abort the prefill side first (if Prefill was called): when its transfer never started, the decode node
        frees the blocks at once; otherwise at the prefill node's fence (or after its quarantine)."""
        no_kv_writes = True
        # A failure means the node is gone or the reservation already expired: either way nothing is held.
        if prefill_stub is not None:
            try:
                answer = await prefill_stub.Abort(
                    cpb.AbortRequest(request_id=rid), timeout=self.config.rpc_timeout_s
                )
                no_kv_writes = not answer.found
            except grpc.aio.AioRpcError:
                no_kv_writes = False
        with contextlib.suppress(grpc.aio.AioRpcError):
            await decode_stub.Abort(
                cpb.AbortRequest(request_id=rid, no_kv_writes=no_kv_writes), timeout=self.config.rpc_timeout_s
            )
