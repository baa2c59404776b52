"""gRPC plumbing shared by every splitserve server: health, reflection, engine errors as status codes, and services
that answer INVALID_ARGUMENT (not UNKNOWN) to request bytes that do not decode."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster.reflection import enable_reflection
from engine.errors import (
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    RequestFailedError,
    ResourceExhaustedError,
    UnknownRequestError,
)

# Tokens of a long stream are small messages; the defaults (4 MiB) only matter for huge prompts.
SERVER_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]


def status_for(exc: EngineError) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UnknownRequestError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ModelLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION
    # This request broke its own computation: not in the router's RETRYABLE, so no other node gets it.
    if isinstance(exc, RequestFailedError):
        return grpc.StatusCode.ABORTED
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: EngineError) -> None:
    """End the RPC with the status matching exc and its message (raises, as grpc.aio's abort does)."""
    await context.abort(status_for(exc), str(exc))


class ServingHealth:
    """The standard grpc.health.v1 service, with SERVING / NOT_SERVING flipped by the node's life cycle."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)


def make_server(
    bind: str, service_names: Iterable[str], interceptors: Iterable[grpc.aio.ServerInterceptor] = ()
) -> tuple[grpc.aio.Server, ServingHealth, int]:
    """A grpc.aio server with health checking and server reflection for the given services; returns the bound port."""
    names = list(service_names)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    serving = ServingHealth(names)
    health_pb2_grpc.add_HealthServicer_to_server(serving.servicer, server)
    enable_reflection([*names, health.SERVICE_NAME], server)
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError:  # newer grpcio raises where older ones returned 0
        port = 0
    if port == 0:  # a port in use, or an address this machine does not have
        raise OSError(f"cannot listen on {bind}")
    return server, serving, port


class _Undecodable:
    """What a checked deserializer returns for bytes that are not the request message (the handler refuses it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _HandlerRecorder:
    """Stands in for a server while a generated add_*Servicer_to_server registers its method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers also arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = dict(handlers)


def add_checked_servicer(
    add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server
) -> None:
    """Register servicer as the generated add_to_server(servicer, server) does, but a unary request whose bytes do
    not decode ends with INVALID_ARGUMENT and a message instead of grpcio's UNKNOWN/INTERNAL."""
    recorder = _HandlerRecorder()
    add_to_server(servicer, recorder)
    for service, handlers in recorder.services.items():
        checked = {name: _checked(handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        server.add_registered_method_handlers(service, checked)


def _checked(handler: Any) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    if handler.request_streaming or deserialize is None:
        return handler  # streamed requests are decoded per message by grpcio; none of ours stream requests

    def decode(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or a string field that is not UTF-8
            return _Undecodable(f"the request message does not decode: {exc}")

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _checked_stream(handler.unary_stream), decode, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        _checked_unary(handler.unary_unary), decode, handler.response_serializer
    )


def _checked_stream(behaviour: Any) -> Any:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for msg in behaviour(request, context):
                yield msg

        return stream
    return _checked_unary(behaviour)  # a handler that writes with context.write and returns


def _checked_unary(behaviour: Any) -> Any:
    async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behaviour(request, context)

    return unary
