"""The public Inference service on a node: the node's engine runs prompt and tokens of a request itself.

Every node type serves it:
- a colocated node: Splitwise's baseline and the router's fallback when no (prefill, decode) pair is available;
- a decode node: when the router prefills locally (cheaper than a remote prefill plus the transfer) or borrows it
  for the prompt pool (mixed pool);
- a prefill node: when the router's mixed pool borrows it for the token pool (keep_local: the prefill engine then
  runs the request to its end instead of handing the KV over).
Life cycle of a request: validate (INVALID_ARGUMENT) -> queue in the engine -> stream deltas -> on client cancel
the stream closes and the engine aborts the request, freeing its blocks; a request that fails inside the engine
ends with its own status (ABORTED), the others go on. `accepting` gates new requests (drain).
The last message's usage carries the node's charges for the request's prompt and decode steps.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from cluster import tracing
from cluster.grpc_util import abort_with
from cluster.power.accounting import ledger_of
from cluster.proto_convert import charged_usage, output_to_proto
from cluster.sampling_proto import sampling_from_proto
from engine.async_engine import AsyncEngine
from engine.errors import EngineError
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc


class WholeRequestService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, engine: AsyncEngine, keep_local: bool = False, accepting: Callable[[], bool] | None = None
    ) -> None:
        self.engine = engine
        self.keep_local = keep_local
        self._own_gate = True
        self._gate = accepting  # a split node's own service decides when it drains
        self.charges = ledger_of(engine)

    @property
    def accepting(self) -> bool:
        return self._gate() if self._gate is not None else self._own_gate

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._own_gate = value

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is draining")
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt: str | list[int] = (
            request.text if request.WhichOneof("prompt") == "text" else list(request.token_ids.ids)
        )
        span = tracing.span_from_grpc("generate", context, {"splitserve.request_id": rid})
        try:
            params = sampling_from_proto(request.sampling)
            await self.engine.prepare(params)  # compiles an output constraint off the engine thread
            stream = await self.engine.generate(rid, prompt, params, keep_local=self.keep_local)
        except EngineError as exc:
            tracing.mark_failed(span, str(exc))
            span.end()
            await abort_with(context, exc)
            return
        try:
            async for out in stream:
                msg = output_to_proto(out)
                if out.finished and self.charges is not None:
                    msg.usage.CopyFrom(charged_usage(self.charges.take(rid)))
                if out.finished:  # the router reports the prompt tokens this node's prefix cache served
                    msg.usage.cached_prompt_tokens = out.num_cached_prompt_tokens
                yield msg
        except EngineError as exc:  # the request failed inside the engine (alone): say why, with its status
            tracing.mark_failed(span, str(exc))
            await abort_with(context, exc)
        finally:
            stream.close()
            span.end()
            if self.charges is not None:
                self.charges.discard(rid)
