"""The public Inference service on the router: validate, place, and relay one request.

A request's life cycle through the router:
1. Validate and tokenize (INVALID_ARGUMENT for an empty or over-long prompt or a wrong model name). Sampling values
   are validated by the first node that sees them, with the engine's own checks.
2. Place it at arrival from the in-memory cluster view (no Redis round trip): a (prefill, decode) pair, or a
   colocated node when no pair exists; UNAVAILABLE at once when there is nothing to place on.
3. Pair: decode.Reserve -> prefill.Prefill (the KV streams between the nodes) -> the first token goes to the client
   -> decode.Decode streams the rest. Colocated: the node's own Generate stream is relayed.
4. A node failure before any token reached the client (reserve refused, transfer failed, node gone) frees what
   was reserved and retries on other nodes, a bounded number of times.
5. Client cancel: the relay's RPCs are cancelled, which aborts the request on both nodes and frees its blocks.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Span

from engine.tokenizer import Tokenizer
from ops import tracing
from ops.cluster_state import ClusterView, NodeState
from router.cluster_index import ClusterIndex, RoleArrays
from router.load_tracker import LoadTracker
from router.metrics import RequestTimer, RouterMetrics
from router.node_clients import NodeClients
from router.policy import Placement, PlacementPolicy, PlacementRequest
from router.relay import OutputLengthEstimate, Relay
from router.request_log import RequestLog, RequestRecord
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc

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
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class RouterConfig:
    model_name: str
    max_model_len: int
    vocab_size: int  # the model's (config.json); may exceed the tokenizer's when the embedding is padded
    max_attempts: int = 3
    reserve_hold_s: float = 60.0
    prefill_deadline_s: float = 60.0
    kv_wait_s: float = 30.0
    rpc_timeout_s: float = 10.0
    # Latency targets handed to placement (cost and power policies keep predictions within them); None: none.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None


class RouterError(Exception):
    """A request the router cannot serve: a status code and a message for the client (gRPC or HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str, too_long: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.too_long = (
            too_long  # the prompt exceeds the context (HTTP answers with OpenAI's error code for it)
        )


class _Retry(Exception):
    """A node failed before the client saw a token; place the request again without `node_id`."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, config: RouterConfig, tokenizer: Tokenizer, view: ClusterView, policy: PlacementPolicy
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.view = view
        self.policy = policy
        self.clients = NodeClients()
        self.tracker = LoadTracker()
        self.index = ClusterIndex()
        self.metrics = RouterMetrics(view)
        self.outputs = OutputLengthEstimate()
        self.requests = RequestLog()  # what the ops dashboard shows of recent requests

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prompt = self.prompt_of(request)
            parent = tracing.caller_context(context)
            async for msg in self.generate(prompt, request.sampling, request.request_id, parent):
                yield msg
        except RouterError as exc:
            await context.abort(exc.code, exc.message)

    def prompt_of(self, request: pb.GenerateRequest) -> list[int]:
        """The request's prompt as token ids, validated; RouterError (NOT_FOUND, INVALID_ARGUMENT) otherwise."""
        if request.model and request.model != self.config.model_name:
            raise RouterError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here ({self.config.model_name!r} is)",
            )
        which = request.WhichOneof("prompt")
        if which == "text":
            # Encoding "" can still yield a BOS token; an empty text is an empty prompt all the same.
            prompt = self.tokenizer.encode(request.text) if request.text else []
        elif which == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            prompt = []
        self.check_prompt(prompt)
        return prompt

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RouterError(
                grpc.StatusCode.INVALID_ARGUMENT, f"token id {bad[0]} is outside the vocabulary"
            )
        if len(prompt) >= self.config.max_model_len:
            raise RouterError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt has {len(prompt)} tokens; the model's context is {self.config.max_model_len} tokens "
                "and at least one must be left to generate",
                too_long=True,
            )

    async def generate(
        self,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        request_id: str = "",
        trace_parent: Context | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Place and relay one validated request (steps 2-5 of the life cycle); RouterError when it cannot be served.

        Traced as one span, "generate" (a trace's root, or the child of the client's trace_parent): the node RPCs
        are its children, and each placement, fallback and retry is one of its events (ops/tracing.py)."""
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        attributes = {"splitserve.request_id": rid, "splitserve.prompt_tokens": len(prompt)}
        record = self.requests.start(rid, len(prompt))
        outcome, error = "cancelled", ""  # unless the stream ends or fails: the client went away
        try:
            with tracing.start_span("generate", trace_parent, attributes) as span:
                async for msg in self._place_and_relay(rid, prompt, sampling, span, record):
                    yield msg
            outcome = "ok"
        except RouterError as exc:
            outcome, error = exc.code.name, exc.message
            raise
        except Exception as exc:
            outcome, error = grpc.StatusCode.INTERNAL.name, str(exc)
            raise
        finally:
            self.requests.finish(record, outcome, error)

    async def _place_and_relay(
        self, rid: str, prompt: list[int], sampling: pb.SamplingParameters, span: Span, record: RequestRecord
    ) -> AsyncIterator[pb.GenerateResponse]:
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        timer = RequestTimer(self.metrics, self.config.model_name, record.arrived)
        relay = Relay(record, sampling.HasField("logprobs"), self.metrics.observe_usage, timer)
        failed: set[str] = set()
        reasons: list[str] = []
        for attempt in range(self.config.max_attempts):
            context_tokens = len(prompt) + len(relay.delivered)
            wanted = PlacementRequest(
                context_tokens,
                min(len(prompt) + max_tokens, self.config.max_model_len),
                expected_output_tokens=self.outputs.expected(max_tokens - len(relay.delivered)),
                ttft_slo_s=self.config.ttft_slo_s,
                tbt_slo_s=self.config.tbt_slo_s,
            )
            self.index.update(self.view.nodes())
            roles = self.index.for_request(self.tracker, exclude=failed)
            placement = self.policy.place(wanted, roles)
            if placement is None:
                reasons.append(_pools_summary(roles))
                break
            if relay.delivered and not placement.disaggregated:
                reasons.append("a stream can resume on a (prefill, decode) pair only, and none is left")
                break
            attempt_id = rid if attempt == 0 else f"{rid}#{attempt}"
            _trace_placement(span, attempt, placement)
            timer.route = "pair" if placement.disaggregated else "colocated"
            record.placed(timer.route, _nodes_of(placement))
            try:
                if placement.disaggregated:
                    stream = self._via_pair(attempt_id, prompt, sampling, placement, relay, span)
                else:
                    stream = self._via_colocated(attempt_id, prompt, sampling, placement, relay, span)
                async for msg in stream:
                    yield msg
                self.outputs.observe(len(relay.delivered))
                return
            except _Retry as retry:
                failed.add(retry.node_id)
                reasons.append(str(retry))
                record.retries.append(str(retry))
                span.add_event(
                    "retry", {"splitserve.node_id": retry.node_id, "splitserve.reason": str(retry)}
                )
            except grpc.aio.AioRpcError as exc:  # the request itself was refused (e.g. INVALID_ARGUMENT)
                self.metrics.request_failed(self.config.model_name, exc.code())
                raise RouterError(exc.code(), exc.details() or "") from exc
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        self.metrics.request_failed(self.config.model_name, grpc.StatusCode.UNAVAILABLE)
        raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no node could serve the request{detail}")

    def _node(self, node_id: str | None) -> NodeState:
        state = self.view.get(node_id or "")
        if state is None:
            raise _Retry(node_id or "?", f"node {node_id} left the cluster")
        return state

    async def _via_pair(
        self,
        rid: str,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        placement: Placement,
        relay: Relay,
        trace: Span,
    ) -> AsyncIterator[pb.GenerateResponse]:
        prefill, decode = self._node(placement.prefill), self._node(placement.decode)
        decode_stub = self.clients.decode(decode.info.address)
        blocks = -(-(len(prompt) + len(relay.delivered)) // decode.info.block_size)
        self.tracker.picked(prefill.info.node_id, rid, len(prompt), 0)
        self.tracker.picked(decode.info.node_id, rid, 0, blocks)
        reserved = False
        try:
            with tracing.start_span("Reserve", trace, {"splitserve.node_id": decode.info.node_id}) as call:
                reply = await self._call(
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
                )
            reserved = True
            prefill_started = time.monotonic()
            with tracing.start_span("Prefill", trace, {"splitserve.node_id": prefill.info.node_id}) as call:
                first = await self._call(
                    prefill,
                    self.clients.prefill(prefill.info.address).Prefill(
                        cpb.PrefillRequest(
                            request_id=rid,
                            prompt_token_ids=prompt,
                            sampling=sampling,
                            decode_node_id=decode.info.node_id,
                            decode_transport_descriptor=decode.info.transport,
                            decode_block_ids=reply.block_ids,
                            deadline_seconds=self.config.prefill_deadline_s,
                            prior_output_token_ids=relay.delivered,
                        ),
                        timeout=self.config.prefill_deadline_s + 1.0,
                        metadata=tracing.metadata_for(call),
                    ),
                )
            self.tracker.done(prefill.info.node_id, rid)
            relay.cached = max(relay.cached, first.cached_prompt_tokens)
            relay.charge(first.charges)
            relay.prefilled(prefill_started, first)
            if first.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                yield relay.message(rid, first.first_text, [first.first_token], first.finish_reason)
                return
            yield relay.message(rid, first.first_text, [first.first_token])
            decode_call = tracing.start_span("Decode", trace, {"splitserve.node_id": decode.info.node_id})
            stream = decode_stub.Decode(
                cpb.DecodeRequest(
                    request_id=rid, first_token=first.first_token, kv_wait_seconds=self.config.kv_wait_s
                ),
                metadata=tracing.metadata_for(decode_call),
            )
            # From here the decode node owns the request's life: closing the stream aborts it there.
            reserved = False
            try:
                async for msg in stream:
                    yield relay.forward(msg)
            except grpc.aio.AioRpcError as exc:
                # Resume on another pair: the relay knows which tokens the client already has; they become the
                # next attempt's prior output, so nothing is repeated and the continuation is the same.
                reason = f"decode node {decode.info.node_id} failed mid-stream: {exc.details()}"
                tracing.mark_failed(decode_call, reason)
                raise _Retry(decode.info.node_id, reason) from exc
            finally:
                stream.cancel()
                decode_call.end()
        finally:
            self.tracker.done(prefill.info.node_id, rid)
            self.tracker.done(decode.info.node_id, rid)
            if reserved:
                await self._abort_quietly(decode_stub, rid)

    async def _via_colocated(
        self,
        rid: str,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        placement: Placement,
        relay: Relay,
        trace: Span,
    ) -> AsyncIterator[pb.GenerateResponse]:
        node = self._node(placement.colocated)
        self.tracker.picked(node.info.node_id, rid, len(prompt), -(-len(prompt) // node.info.block_size))
        forwarded = pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
        call = tracing.start_span("Generate", trace, {"splitserve.node_id": node.info.node_id})
        stream = self.clients.colocated(node.info.address).Generate(
            forwarded, metadata=tracing.metadata_for(call)
        )
        started = False
        try:
            async for msg in stream:
                started = True
                yield relay.forward(msg)
        except grpc.aio.AioRpcError as exc:
            tracing.mark_failed(call, exc.details() or exc.code().name)
            if not started and exc.code() not in RETRYABLE:
                raise
            raise _Retry(node.info.node_id, f"colocated node {node.info.node_id}: {exc.details()}") from exc
        finally:
            stream.cancel()
            call.end()
            self.tracker.done(node.info.node_id, rid)

    async def _call(self, node: NodeState, call):
        """Await a unary RPC; node failures become _Retry, request errors reach the client unchanged."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRYABLE:
                raise _Retry(
                    node.info.node_id, f"{node.info.role} node {node.info.node_id}: {exc.details()}"
                ) from exc
            raise

    async def _abort_quietly(self, decode_stub, rid: str) -> None:
        # A failure means the node is gone or the reservation already expired: either way nothing is held.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await decode_stub.Abort(cpb.AbortRequest(request_id=rid), timeout=self.config.rpc_timeout_s)


def _pools_summary(roles: dict[str, RoleArrays]) -> str:
    """Why nothing could be placed, for the client and the operator: usable nodes per pool."""
    counts = ", ".join(f"{role} {int(arrays.usable.sum())}/{len(arrays)}" for role, arrays in roles.items())
    return f"usable nodes per pool: {counts}"


def _nodes_of(placement: Placement) -> dict[str, str]:
    if placement.disaggregated:
        return {"prefill": placement.prefill or "", "decode": placement.decode or ""}
    return {"borrowed" if placement.borrowed else "colocated": placement.colocated or ""}


def _trace_placement(span: Span, attempt: int, placement: Placement) -> None:
    """A placement as an event of the request's span: "placed" on a pair, "fallback" on one node doing both phases."""
    if placement.disaggregated:
        where = {
            "splitserve.prefill_node": placement.prefill or "",
            "splitserve.decode_node": placement.decode or "",
        }
    else:
        where = {"splitserve.colocated_node": placement.colocated or ""}
    span.add_event(
        "placed" if placement.disaggregated else "fallback", {"splitserve.attempt": attempt, **where}
    )
    if attempt == 0:
        span.set_attributes(where)
