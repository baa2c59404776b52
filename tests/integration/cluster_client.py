"""Helpers for tests that talk to a real local cluster over gRPC."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc

if TYPE_CHECKING:
    from ops.launcher import LocalCluster

CALL_TIMEOUT_S = 120.0


@dataclass
class StreamResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    usage: pb.Usage | None = None
    messages: int = 0


async def generate(
    address: str, prompt: list[int] | str, on_tokens: Callable[[int], None] | None = None, **sampling: object
) -> StreamResult:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(**sampling))  # type: ignore[arg-type]
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    result = StreamResult()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        async for msg in stub.Generate(request, timeout=CALL_TIMEOUT_S):
            result.messages += 1
            result.token_ids += list(msg.token_ids)
            if on_tokens is not None:
                on_tokens(len(msg.token_ids))
            result.text += msg.text
            if msg.finish_reason:
                result.finish_reason = msg.finish_reason
                result.usage = msg.usage
    return result


def generate_many(address: str, prompts: list[list[int]], **sampling: object) -> list[StreamResult]:
    async def main() -> list[StreamResult]:
        return await asyncio.gather(*(generate(address, p, **sampling) for p in prompts))

    return asyncio.run(main())


def status_of(address: str, prompt: list[int] | str, **sampling: object) -> tuple[grpc.StatusCode, str]:
    """The status a request ends with (OK if it completes)."""
    try:
        asyncio.run(generate(address, prompt, **sampling))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def recent_requests(cluster: LocalCluster, n: int) -> list[dict]:
    """The router's last n requests, newest first (its dashboard API): nodes, retries, phases, KV bytes."""
    address = cluster.by_role("router")[0].ready["http_address"]
    with urllib.request.urlopen(f"http://{address}/dashboard/api/state", timeout=10) as reply:
        recent = json.load(reply)["requests"]["recent"]
    return list(recent[:n])


def backend_available(name: str) -> bool:
    """Whether the KV transport `name` can be created here (NIXL is an optional package)."""
    if name == "nixl":
        try:
            import nixl  # noqa: F401
        except ImportError:
            return False
    return True
