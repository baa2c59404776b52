"""The router stays responsive whatever a client sends (issue 12, item 5), on a real split cluster.

Long prompts are tokenized off the event loop, request bodies have a size check before reading and a read deadline,
parser-level errors are OpenAI-shaped JSON, and gRPC bytes that do not decode get INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import statistics
import string
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
BODY_TIMEOUT_S = 2.0
BIG_PROMPT_BYTES = 7 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=1,
        decode=1,
        grpc_port=0,
        http_port=0,
        # One tokenizer thread: on the 2-core CI machine two would take both cores, and the small request would
        # then wait for CPU, not for the event loop this test is about.
        router_args=["--body-timeout-s", str(BODY_TIMEOUT_S), "--tokenizer-threads", "1"],
    )
    with LocalCluster(spec) as running:
        yield running


def big_prompt(size: int, seed: int) -> str:
    """Random words (a realistic tokenizer workload: merges, pre-tokenization) of about `size` bytes."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
    return " ".join(rng.choices(words, k=size // 5))[:size]


def test_three_7mb_prompts_do_not_stall_a_small_request(cluster: LocalCluster, llama_dir: Path) -> None:
    url = f"http://{cluster.http_address}/v1/completions"
    small = {"model": llama_dir.name, "prompt": "Hello there", "max_tokens": 2, "temperature": 0}
    bodies = [
        json.dumps({"model": llama_dir.name, "prompt": big_prompt(BIG_PROMPT_BYTES, seed), "max_tokens": 2})
        for seed in range(3)
    ]

    async def main() -> tuple[list[float], list[float], list[tuple[int, dict[str, object], float]], float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:

            async def timed_small() -> float:
                started = time.monotonic()
                async with session.post(url, json=small) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                return time.monotonic() - started

            async def big(body: str) -> tuple[int, dict[str, object], float]:
                data = io.BytesIO(body.encode())  # raw bytes this big would make aiohttp warn
                async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
                    return resp.status, await resp.json(), time.monotonic()

            await timed_small()  # warm-up: connections, first placement
            idle = [await timed_small() for _ in range(7)]
            bigs = [asyncio.create_task(big(body)) for body in bodies]
            await asyncio.sleep(1.5)  # the bodies are up and being tokenized
            loaded = [await timed_small() for _ in range(7)]
            measured_until = time.monotonic()
            return idle, loaded, await asyncio.gather(*bigs), measured_until

    idle, loaded, big_results, measured_until = asyncio.run(main())
    for status, body, _ in big_results:
        assert status == 400, body
        assert body["error"]["code"] == "context_length_exceeded"  # type: ignore[index]
    # The small requests really ran while the long prompts were being tokenized.
    assert max(done for _, _, done in big_results) > measured_until
    idle_s, loaded_s = statistics.median(idle), statistics.median(loaded)
    assert loaded_s < 2 * idle_s, f"idle {idle}, while tokenizing 3 x 7 MB {loaded}"


def raw_exchange(address: str, payload: bytes, wait_s: float = 10.0) -> tuple[bytes, float, bool]:
    """Send raw bytes, read the reply until the server closes or wait_s; (reply, seconds to reply, closed)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        reply, closed = b"", False
        sock.settimeout(wait_s)
        elapsed = None
        try:
            while True:
                chunk = sock.recv(65536)
                if elapsed is None:
                    elapsed = time.monotonic() - started
                if not chunk:
                    closed = True
                    break
                reply += chunk
        except TimeoutError:
            pass
    return reply, elapsed if elapsed is not None else wait_s, closed


def status_and_json(reply: bytes) -> tuple[int, dict[str, dict[str, object]]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


def post_head(length: int | str) -> bytes:
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(cluster: LocalCluster) -> None:
    reply, elapsed, closed = raw_exchange(cluster.http_address, post_head(100) + b'{"model": ', wait_s=15)
    status, body = status_and_json(reply)
    assert status == 408 and "did not arrive" in str(body["error"]["message"])
    assert BODY_TIMEOUT_S - 0.5 < elapsed < BODY_TIMEOUT_S + 3
    assert closed


def test_a_huge_content_length_gets_413_at_once(cluster: LocalCluster) -> None:
    reply, elapsed, closed = raw_exchange(cluster.http_address, post_head(99999999999), wait_s=15)
    status, body = status_and_json(reply)
    assert status == 413 and "larger than" in str(body["error"]["message"])
    assert elapsed < 1.0  # the answer comes at once
    assert closed  # and the connection is not held: it closes once the (bounded) drain of the body gives up


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nBad Header Without Colon\r\n\r\n",
        b"POST /v1/completions HTTP/9.9\r\nHost: router\r\n\r\n",
        post_head("12abc"),
    ],
    ids=["request-line", "header", "version", "content-length"],
)
def test_parser_level_errors_are_openai_json(cluster: LocalCluster, payload: bytes) -> None:
    reply, elapsed, closed = raw_exchange(cluster.http_address, payload)
    status, body = status_and_json(reply)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    assert elapsed < 1.0 and closed


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12\x03\x0a\x01"],
    ids=["junk", "utf8", "cut"],
)
def test_grpc_bytes_that_do_not_decode_get_invalid_argument(cluster: LocalCluster, raw: bytes) -> None:
    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            method = channel.unary_stream("/splitserve.v1.Inference/Generate")
            try:
                async for _ in method(raw, timeout=10):
                    pass
            except grpc.aio.AioRpcError as exc:
                assert "does not decode" in (exc.details() or "")
                return exc.code()
            return grpc.StatusCode.OK

    assert asyncio.run(call()) == grpc.StatusCode.INVALID_ARGUMENT
