"""A colocated node's public Inference service: the engine runs prompt and tokens of a request itself.

It is Splitwise's baseline and the router's fallback when no (prefill, decode) pair is available. Life cycle of a
request: validate (INVALID_ARGUMENT) -> queue in the engine -> stream deltas -> on client cancel the stream closes
and the engine aborts the request, freeing its blocks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import EngineError
from ops.grpc_util import abort_with
from ops.proto_convert import output_to_proto, sampling_from_proto
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc


class ColocatedService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.accepting = True

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "colocated node is draining")
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt: str | list[int] = (
            request.text if request.WhichOneof("prompt") == "text" else list(request.token_ids.ids)
        )
        try:
            stream = await self.engine.generate(rid, prompt, sampling_from_proto(request.sampling))
        except EngineError as exc:
            await abort_with(context, exc)
            return
        try:
            async for out in stream:
                yield output_to_proto(out)
        finally:
            stream.close()
