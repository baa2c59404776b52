"""The cluster token: a shared secret that every internal call between cluster members carries.

Nodes serve the internal services (PrefillNode: Prefill, Abort; DecodeNode: Reserve, Decode, Abort) and, for the
router's colocated and mixed-pool requests, the public Inference service too. None of these may answer a caller that
is not a cluster member, or a client with only the router's API key could reserve KV, abort other users' requests or
bypass the router altogether. So:

1. Every process of a cluster gets the same token: `--cluster-token`, `--cluster-token-file` (a mounted Kubernetes
   Secret) or `$SPLITSERVE_CLUSTER_TOKEN`, in that order. `splitserve up` generates one when none is given and hands
   it to its children through the environment, never argv (which `ps` shows to every user of the machine).
2. A node's gRPC server checks `x-splitserve-cluster-token` on every call with `ClusterTokenInterceptor` (constant
   time); health checking and server reflection stay open for probes. A call without the token ends
   UNAUTHENTICATED before any handler runs.
3. A router wraps its channels to the nodes with `with_cluster_token`: every call on them carries the token.
4. The KV transport gets the token too (torch backend: a peer's connect request carries an HMAC of its pair key).

A node started without any token serves every caller, as before: fine on a laptop, never on a shared network.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

TOKEN_METADATA_KEY = "x-splitserve-cluster-token"
TOKEN_ENV = "SPLITSERVE_CLUSTER_TOKEN"
# Probes and generic clients may discover a node; everything else needs the token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


class ClusterTokenError(ValueError):
    """A token file that cannot be read, or a token that is empty."""


def generate_token() -> str:
    """A fresh random cluster token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def resolve_token(flag: str | None = None, file: Path | None = None) -> str | None:
    """The cluster token from the flag, else the file (stripped), else $SPLITSERVE_CLUSTER_TOKEN; None if none."""
    if flag:
        return flag
    if file is not None:
        try:
            token = file.read_text().strip()
        except OSError as exc:
            raise ClusterTokenError(f"cannot read --cluster-token-file {file}: {exc.strerror}") from None
        if not token:
            raise ClusterTokenError(f"--cluster-token-file {file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def token_matches(given: str | bytes, token: str) -> bool:
    """Whether `given` is the cluster token, compared in constant time."""
    given_bytes = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given_bytes, token.encode())


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call but health and reflection that does not carry the cluster token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the cluster token must not be empty")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._authorized(handler_call_details):
            return handler
        return _refusing_like(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                return token_matches(value, self._token)
        return False


def _refusing_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (so the request still decodes) that only refuses."""
    kinds = {"request_deserializer": handler.request_deserializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse, **kinds)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse, **kinds)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse, **kinds)
    return grpc.stream_stream_rpc_method_handler(_refuse, **kinds)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"this is an internal cluster port: calls need the cluster token ({TOKEN_METADATA_KEY})",
    )


class _WithToken:
    """A multi-callable whose every call adds the token to the caller's metadata (tracing headers stay)."""

    def __init__(self, inner: Any, pair: tuple[str, str]) -> None:
        self._inner = inner
        self._pair = pair

    def __call__(self, request: Any, *, metadata: Any = None, **kwargs: Any) -> Any:
        return self._inner(request, metadata=(*(metadata or ()), self._pair), **kwargs)


class TokenChannel:
    """A grpc.aio channel as the generated stubs use it, adding the cluster token to every call."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.channel = channel
        self._pair = (TOKEN_METADATA_KEY, token)

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self.channel.unary_unary(*args, **kwargs), self._pair)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self.channel.unary_stream(*args, **kwargs), self._pair)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self.channel.stream_unary(*args, **kwargs), self._pair)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self.channel.stream_stream(*args, **kwargs), self._pair)

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)


def with_cluster_token(channel: grpc.aio.Channel, token: str | None) -> Any:
    """`channel` itself without a token, else a TokenChannel around it (for the generated stubs)."""
    return channel if not token else TokenChannel(channel, token)
