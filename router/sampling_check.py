"""Refuses, at the router, sampling values and request ids that no node would accept (or that would break one).

The router runs the engine's own checks (SamplingParams.validate with the bounds of engine/limits.py; both are
torch-free), so its answer is exactly the node's, only earlier: a poison request never reaches a node, and the gRPC
and HTTP paths (both pass InferenceService.generate) refuse the same values with INVALID_ARGUMENT / 400.
"""

from __future__ import annotations

import grpc

from cluster.sampling_proto import sampling_from_proto
from engine.errors import InvalidRequestError
from engine.limits import MAX_REQUEST_ID_CHARS
from router.errors import RouterError
from splitserve.v1 import inference_pb2 as pb


def check_sampling(msg: pb.SamplingParameters, request_id: str = "") -> None:
    """Raise RouterError(INVALID_ARGUMENT) naming the first bad field of msg, or an over-long client request_id."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RouterError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_id may have at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}",
        )
    try:
        sampling_from_proto(msg)
    except InvalidRequestError as exc:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
