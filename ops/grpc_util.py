"""gRPC plumbing shared by every splitserve server: health, reflection, and engine errors as status codes."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import (
    EngineError,
    InvalidRequestError,
    ModelLoadError,
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
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot listen on {bind}")
    return server, serving, port
