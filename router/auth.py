"""API-key checking for the router: the public Inference service (gRPC) needs `authorization: Bearer <key>`; the
HTTP endpoints that need the key (/v1/*, dashboard actions) check the same header with `bearer_matches`.

Health checking and server reflection stay open, so probes and generic clients can still discover the service.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/splitserve.v1.Inference/"


def bearer_matches(header: str | bytes, api_key: str) -> bool:
    """Whether an Authorization header carries `Bearer <api_key>` (compared in constant time)."""
    given = header.encode() if isinstance(header, str) else header
    return hmac.compare_digest(given, f"Bearer {api_key}".encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not handler_call_details.method.startswith(PROTECTED_PREFIX) or self._authorized(
            handler_call_details
        ):
            return await continuation(handler_call_details)
        return grpc.unary_stream_rpc_method_handler(_refuse)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_matches(value, self._api_key)
        return False


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key (authorization: Bearer <key>)"
    )
