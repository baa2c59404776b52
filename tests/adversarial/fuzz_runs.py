"""Run the fuzz strategies (tests/adversarial/fuzz_inputs.py) against a live router: one keep-alive HTTP session or
one gRPC channel, `examples` inputs, findings tallied rather than raised (so hypothesis never shrinks against a live
cluster). `seed=None` derandomizes (the tests: the same inputs every run); a seed gives another reproducible set."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as with_seed

from splitserve.v1 import inference_pb2 as pb
from tests.adversarial.fuzz_inputs import HttpCase, Tally, grpc_messages, http_cases, send_grpc, send_http


def fuzz_http(base_url: str, model: str, examples: int, seed: int | None = None) -> Tally:
    """Send `examples` generated HTTP requests to base_url (http://host:port); the tally of the answers."""
    tally = Tally()
    with asyncio.Runner() as runner:
        session = runner.run(_session())

        @given(case=http_cases(model))
        def one(case: HttpCase) -> None:
            runner.run(send_http(session, base_url, case, tally))

        try:
            _configured(one, examples, seed)()
        finally:
            runner.run(session.close())
    return tally


def fuzz_grpc(address: str, model: str, examples: int, seed: int | None = None) -> Tally:
    """Send `examples` generated Generate messages (about a quarter raw bytes) to address; the tally of the answers."""
    tally = Tally()
    with asyncio.Runner() as runner:
        channel = runner.run(_channel(address))

        @given(message=grpc_messages(model))
        def one(message: bytes | pb.GenerateRequest) -> None:
            runner.run(send_grpc(channel, message, tally))

        try:
            _configured(one, examples, seed)()
        finally:
            runner.run(channel.close())
    return tally


def _configured(test: Callable[..., None], examples: int, seed: int | None) -> Callable[[], None]:
    configured: Any = settings(
        max_examples=examples,
        deadline=None,  # each call has its own client timeout
        derandomize=seed is None,
        database=None,
        phases=[Phase.generate],  # findings are tallied, never raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )(test)
    return configured if seed is None else with_seed(seed)(configured)


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)
