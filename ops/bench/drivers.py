"""How `splitserve bench` talks to a server: OpenAI-compatible HTTP (any server) or splitserve's gRPC endpoint.

Each driver sends one request, streams the answer and returns a RequestTiming with client-side timestamps. Output
length is forced the way servers allow it: `max_tokens` plus `ignore_eos` (vLLM and splitserve honour it; others
ignore it and may stop early, which the per-request output_tokens then shows).
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import aiohttp
import grpc

from ops.bench.metrics import RequestTiming
from ops.bench.prompts import BuiltPrompt
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc


class Driver(Protocol):
    name: str

    async def send(self, prompt: BuiltPrompt, output_tokens: int, timeout_s: float) -> RequestTiming: ...

    async def close(self) -> None: ...


class OpenAIDriver:
    """Streams /v1/completions or /v1/chat/completions as server-sent events."""

    def __init__(self, base_url: str, model: str, *, chat: bool = False, api_key: str | None = None) -> None:
        self.name = "openai-chat" if chat else "openai-completions"
        self.url = base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")
        self.model = model
        self.chat = chat
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))

    async def send(self, prompt: BuiltPrompt, output_tokens: int, timeout_s: float) -> RequestTiming:
        body: dict[str, object] = {
            "model": self.model,
            "max_tokens": output_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        start = time.perf_counter()
        chunk_times: list[float] = []  # chunks that carried text
        first_content: float | None = (
            None  # the first chunk with a choice, text or not (a token may decode to "")
        )
        usage_tokens: int | None = None
        server_ttft: float | None = None
        cached: int | None = None
        texts: list[str] = []
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.post(self.url, json=body, timeout=timeout) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    return _failed(start, prompt, f"http_{response.status}: {detail}")
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return _failed(start, prompt, f"stream_error: {event['error'].get('message', '')}")
                    now = time.perf_counter()
                    text = _choice_text(event, self.chat)
                    if text is not None and first_content is None:
                        first_content = now
                    if text:
                        chunk_times.append(now)
                        texts.append(text)
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                        server_ttft = event["usage"].get("server_ttft_s")
                        cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            return _failed(start, prompt, f"{type(exc).__name__}: {exc}")
        # SSE carries text, not tokens: one token per text chunk, the usage count's remainder on the last chunk.
        # Tokens whose text is empty (a partial UTF-8 character) arrive as empty chunks: usage still counts them.
        tokens = usage_tokens if usage_tokens is not None else len(chunk_times)
        if not chunk_times and tokens and first_content is not None:
            chunk_times = [first_content]
        token_times = (chunk_times + chunk_times[-1:] * max(0, tokens - len(chunk_times)))[:tokens]
        return RequestTiming(
            start=start,
            first_token=token_times[0] if token_times else None,
            token_times=token_times,
            end=time.perf_counter(),
            prompt_tokens=prompt.num_tokens,
            output_tokens=tokens,
            error=None if token_times else "empty: no output token",
            server_ttft=server_ttft,
            cached_prompt_tokens=cached,
            output_text="".join(texts),
        )

    async def close(self) -> None:
        await self._session.close()


class GrpcDriver:
    """splitserve's Inference/Generate; token ids per message give exact per-token arrival times."""

    name = "grpc"

    def __init__(self, address: str, *, api_key: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def send(self, prompt: BuiltPrompt, output_tokens: int, timeout_s: float) -> RequestTiming:
        sampling = pb.SamplingParameters(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt.token_ids), sampling=sampling)
        start = time.perf_counter()
        token_times: list[float] = []
        token_ids: list[int] = []
        texts: list[str] = []
        server_ttft = None
        cached = None
        try:
            async for msg in self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata):
                token_times += [time.perf_counter()] * len(msg.token_ids)
                token_ids += msg.token_ids
                texts.append(msg.text)
                if msg.finish_reason:
                    server_ttft = msg.usage.ttft_seconds
                    cached = msg.usage.cached_prompt_tokens
        except grpc.aio.AioRpcError as exc:
            return _failed(start, prompt, f"grpc_{exc.code().name.lower()}: {exc.details()}")
        return RequestTiming(
            start=start,
            first_token=token_times[0] if token_times else None,
            token_times=token_times,
            end=time.perf_counter(),
            prompt_tokens=prompt.num_tokens,
            output_tokens=len(token_times),
            error=None if token_times else "empty: no output token",
            server_ttft=server_ttft,
            cached_prompt_tokens=cached,
            output_token_ids=token_ids,
            output_text="".join(texts),
        )

    async def close(self) -> None:
        await self._channel.close()


def _choice_text(event: dict, chat: bool) -> str | None:
    """The chunk's new text ("" for a token without visible text); None for chunks that carry no token.

    Chat streams open with a role-only delta, which is not a token.
    """
    for choice in event.get("choices") or ():
        if chat:
            delta = choice.get("delta") or {}
            if "role" in delta and not delta.get("content"):
                continue
            text = delta.get("content")
        else:
            text = choice.get("text")
        if text is not None:
            return str(text)
    return None


def _failed(start: float, prompt: BuiltPrompt, error: str) -> RequestTiming:
    return RequestTiming(
        start=start,
        first_token=None,
        token_times=[],
        end=time.perf_counter(),
        prompt_tokens=prompt.num_tokens,
        output_tokens=0,
        error=error,
    )
