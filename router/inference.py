"""The public Inference service on the router: validate, place, and relay one request.

A request's life cycle through the router:
1. Validate and tokenize (INVALID_ARGUMENT for an empty or over-long prompt or a wrong model name). Sampling values
   and the client's request_id are checked against the engine's own limits (router/sampling_check.py). Long texts
   are tokenized on a small thread pool (router/prompt_encoder.py), so the event loop keeps serving while they encode.
1b. Admission (router/admission.py): the router runs at most max_concurrent_requests at once and queues at most
   max_queued_requests more, for a bounded time; beyond that RESOURCE_EXHAUSTED at once (HTTP: 429).
2. Place it at arrival from the in-memory cluster view (no Redis round trip): a (prefill, decode) pair, or a
   colocated node when no pair exists; UNAVAILABLE at once when there is nothing to place on.
3. Pair: decode.Reserve -> prefill.Prefill (the KV streams between the nodes) -> the first token goes to the client
   -> decode.Decode streams the rest. Colocated: the node's own Generate stream is relayed. Each attempt has its
   own cluster-internal id (uuid4), which is what nodes see: the client's request_id is only a label (logs, traces,
   the dashboard, and the responses), so two clients using the same id never touch each other's request.
4. A node failure (reserve refused, transfer failed, node gone) frees what was reserved and retries on other nodes,
   a bounded number of times; tokens the client already has become the next attempt's prior output. The failure is
   blamed on the node that caused it (router/attempts.py). A Prefill that failed because of its decode peer blames
   their link: the next attempt keeps the prefill node (its prefix cache has the prompt) with another decode node,
   else avoids both, else either one; a failed pair is never placed again for the request, and a node whose links
   to two peers failed is avoided altogether. Every wait on a node is bounded (router/liveness.py): it
   ends when the node leaves the cluster view (killed, paused, cut off: its lease lapses within ~2.5 s).
5. Client cancel: the relay's RPCs are cancelled, which aborts the request on both nodes and frees its blocks (the
   prefill node fences the transfer, so the decode node frees blocks at once rather than after a quarantine).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Span

from cluster import tracing
from cluster.node_clients import NodeClients
from cluster.state import ClusterView
from engine.tokenizer import Tokenizer
from router.admission import (
    Admission,
    Overloaded,
)
from router.attempts import Attempts, RetryElsewhere
from router.cluster_index import ClusterIndex, RoleArrays
from router.config import RouterConfig
from router.errors import RouterError
from router.kv_index import KVIndex
from router.kv_policy import lookup_cached_tokens
from router.load_tracker import LoadTracker
from router.metrics import RequestTimer, RouterMetrics
from router.policy import Placement, PlacementPolicy, PlacementRequest
from router.prompt_encoder import EncoderBusy, PromptEncoder, PromptTooLong
from router.relay import OutputLengthEstimate, Relay
from router.request_log import RequestLog, RequestRecord
from router.sampling_check import check_sampling
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16


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
        self.kv_index: KVIndex | None = None  # set by the server when the policy reads cached prefixes
        self.metrics = RouterMetrics(view)
        self.outputs = OutputLengthEstimate()
        self.requests = RequestLog()  # what the ops dashboard shows of recent requests
        self.admission = Admission(
            config.max_concurrent_requests, config.max_queued_requests, config.queue_timeout_s
        )
        self.encoder = PromptEncoder(tokenizer, max_workers=config.tokenizer_threads)
        self.attempts = Attempts(config, view, self.clients, self.tracker)  # router/attempts.py

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prompt = await self.prompt_of(request)
            parent = tracing.caller_context(context)
            async with self.admission.slot():
                async for msg in self.generate(prompt, request.sampling, request.request_id, parent):
                    yield msg
        except RouterError as exc:
            await context.abort(exc.code, exc.message)
        except (Overloaded, EncoderBusy) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def prompt_of(self, request: pb.GenerateRequest) -> list[int]:
        """The request's prompt as token ids, validated; RouterError (NOT_FOUND, INVALID_ARGUMENT) otherwise.

        Long texts are tokenized on the encoder's threads, so the event loop keeps serving other requests."""
        if request.model and request.model != self.config.model_name:
            raise RouterError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here ({self.config.model_name!r} is)",
            )
        which = request.WhichOneof("prompt")
        if which == "text":
            # Encoding "" can still yield a BOS token; an empty text is an empty prompt all the same (encoder).
            try:
                prompt = await self.encoder.encode(request.text, limit=self.config.max_model_len)
            except PromptTooLong as exc:
                raise RouterError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt has {exc.tokens} tokens; the model's context is {self.config.max_model_len} "
                    "tokens and at least one must be left to generate",
                    too_long=True,
                ) from None
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
        are its children, and each placement, fallback and retry is one of its events (cluster/tracing.py)."""
        try:  # poison values never reach a node (router/sampling_check.py)
            check_sampling(sampling, request_id)
        except RouterError as exc:
            self.metrics.request_failed(self.config.model_name, exc.code)
            raise
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
        self,
        label: str,
        prompt: list[int],
        sampling: pb.SamplingParameters,
        span: Span,
        record: RequestRecord,
    ) -> AsyncIterator[pb.GenerateResponse]:
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        timer = RequestTimer(self.metrics, self.config.model_name, record.arrived)
        relay = Relay(record, sampling.HasField("logprobs"), self.metrics.observe_usage, timer)
        failed: set[str] = set()
        failed_links: list[tuple[str, str]] = []  # (prefill, decode) pairs whose KV transfer failed
        reasons: list[str] = []
        for attempt in range(self.config.max_attempts):
            context_tokens = len(prompt) + len(relay.delivered)
            wanted = PlacementRequest(
                context_tokens,
                min(len(prompt) + max_tokens, self.config.max_model_len),
                expected_output_tokens=self.outputs.expected(max_tokens - len(relay.delivered)),
                ttft_slo_s=self.config.ttft_slo_s,
                tbt_slo_s=self.config.tbt_slo_s,
                resuming=bool(relay.delivered),
                prefix_pull=self.config.prefix_pull,
            )
            self.index.update(self.view.nodes())
            cached = self._cached_tokens(prompt + relay.delivered)
            placement, roles = self._place(wanted, failed, failed_links, cached)
            if placement is None:
                reasons.append(_pools_summary(roles))
                break
            if relay.delivered and not placement.disaggregated:
                reasons.append("a stream can resume on a (prefill, decode) pair only, and none is left")
                break
            attempt_id = uuid.uuid4().hex  # what the nodes know this attempt by; never the client's label
            _trace_placement(span, attempt, placement, attempt_id)
            timer.route = "pair" if placement.disaggregated else "colocated"
            record.placed(timer.route, _nodes_of(placement))
            try:
                if placement.disaggregated:
                    stream = self.attempts.via_pair(
                        attempt_id, prompt, sampling, placement, relay, span, cached
                    )
                else:
                    stream = self.attempts.via_colocated(
                        attempt_id, prompt, sampling, placement, relay, span, cached
                    )
                async for msg in stream:
                    yield msg
                self.outputs.observe(len(relay.delivered))
                return
            except RetryElsewhere as retry:
                if retry.link is not None:
                    failed_links.append(retry.link)
                    failed |= _ends_of_two_failed_links(failed_links)
                else:
                    failed.add(retry.node_id)
                blamed = "link" if retry.link is not None else "node"
                self.metrics.retried(blamed)
                logger.warning(
                    "request %s: attempt %d failed (%s blamed), placing it again: %s",
                    label,
                    attempt + 1,
                    blamed,
                    retry,
                )
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

    def _cached_tokens(self, context: list[int]) -> dict[str, int]:
        """Per node, the leading context tokens in its prefix cache (only for policies that weigh them)."""
        if self.kv_index is None or not getattr(self.policy, "kv_aware", False):
            return {}
        return lookup_cached_tokens(self.kv_index, context, self.index.block_sizes)

    def _place(
        self,
        wanted: PlacementRequest,
        failed: set[str],
        failed_links: list[tuple[str, str]],
        cached: dict[str, int],
    ) -> tuple[Placement | None, dict[str, RoleArrays]]:
        """A placement avoiding the failed nodes and every failed link. After a link failed, in order: the last
        failed link's prefill node with another decode node (its prefix cache holds the prompt; the decode node was
        the likelier culprit), neither end of any failed link, another prefill node, another decode node."""
        choices = [failed]
        if failed_links:
            prefills, decodes = {p for p, _ in failed_links}, {d for _, d in failed_links}
            last = failed_links[-1][0]
            other_prefills = {s.info.node_id for s in self.view.nodes("prefill")} - {last}
            keep_last = other_prefills | {d for p, d in failed_links if p == last}
            choices = [failed | keep_last, failed | prefills | decodes, failed | prefills, failed | decodes]
        for exclude in choices:
            roles = self.index.for_request(self.tracker, exclude=exclude, cached_tokens=cached)
            placement = self.policy.place(wanted, roles)
            if placement is None or (placement.prefill, placement.decode) in failed_links:
                continue
            if (
                placement.disaggregated or exclude is choices[-1]
            ):  # one node for both: only when no pair is left
                return placement, roles
        return None, roles


def _ends_of_two_failed_links(links: list[tuple[str, str]]) -> set[str]:
    """Nodes whose links to two different peers failed: the node itself is cut off (or down), not one path."""
    prefill_peers: dict[str, set[str]] = {}
    decode_peers: dict[str, set[str]] = {}
    for prefill, decode in links:
        prefill_peers.setdefault(prefill, set()).add(decode)
        decode_peers.setdefault(decode, set()).add(prefill)
    return {n for peers in (prefill_peers, decode_peers) for n, seen in peers.items() if len(seen) >= 2}


def _pools_summary(roles: dict[str, RoleArrays]) -> str:
    """Why nothing could be placed, for the client and the operator: usable nodes per pool."""
    counts = ", ".join(f"{role} {int(arrays.usable.sum())}/{len(arrays)}" for role, arrays in roles.items())
    return f"usable nodes per pool: {counts}"


def _nodes_of(placement: Placement) -> dict[str, str]:
    if placement.disaggregated:
        return {"prefill": placement.prefill or "", "decode": placement.decode or ""}
    return {"borrowed" if placement.borrowed else "colocated": placement.colocated or ""}


def _trace_placement(span: Span, attempt: int, placement: Placement, attempt_id: str) -> None:
    """A placement as an event of the request's span: "placed" on a pair, "fallback" on one node doing both phases.
    The event carries the attempt's cluster-internal id, the one the nodes' own spans and logs use."""
    if placement.disaggregated:
        where = {
            "splitserve.prefill_node": placement.prefill or "",
            "splitserve.decode_node": placement.decode or "",
        }
    else:
        where = {"splitserve.colocated_node": placement.colocated or ""}
    span.add_event(
        "placed" if placement.disaggregated else "fallback",
        {"splitserve.attempt": attempt, "splitserve.attempt_id": attempt_id, **where},
    )
    if attempt == 0:
        span.set_attributes(where)
