"""Multi-turn conversations: the workload that prefix caches and KV-aware routing are for.

`splitserve bench --turns T` groups the workload's requests into conversations of T consecutive requests. Each
request's prompt length becomes the length of that turn's new user message, its output length the answer's. Turn k
sends the whole conversation so far: an optional system prompt shared by every conversation (`--system-prompt-len`),
then each earlier message followed by the answer the server actually gave, then the new message. So turn k's prompt
extends turn k-1's prompt and output, as a chat client's does, and a server that keeps (or routes to) that prefix
computes only the new part; the summary's cached prompt tokens show how much it did.

Turns of a conversation are sequential: the next one is sent `think_s` after the previous answer ended. In open
mode a conversation starts at its first request's arrival time; in closed mode `concurrency` conversations are kept
going. A conversation ends early when its next prompt plus output would pass `max_context`, or when a turn failed
(the rest of it is not sent). Over gRPC the context is the exact token ids (prompt and output ids); over HTTP it is
text, so the server's token count can differ by a token or so at the joins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from ops.bench.drivers import Driver
from ops.bench.metrics import RequestTiming
from ops.bench.prompts import BuiltPrompt
from ops.bench.workload import Workload


def conversation_starts(num_requests: int, turns: int) -> list[range]:
    """The workload positions of each conversation: turns consecutive requests (the last one may be shorter)."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, not {turns}")
    return [range(first, min(first + turns, num_requests)) for first in range(0, num_requests, turns)]


async def run_conversations(
    workload: Workload,
    messages: Sequence[BuiltPrompt],
    driver: Driver,
    *,
    turns: int,
    think_s: float = 0.0,
    system: BuiltPrompt | None = None,
    max_context: int | None = None,
    request_timeout_s: float = 300.0,
    on_done: Callable[[RequestTiming], None] | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> list[RequestTiming]:
    """The timings of the turns sent, in workload order (turns not sent are left out).

    encode: the tokenizer, for answers that come back as text only (HTTP): their ids count toward the context."""
    if len(messages) != len(workload.requests):
        raise ValueError(f"{len(messages)} messages for {len(workload.requests)} requests")
    if think_s < 0:
        raise ValueError(f"think time must be >= 0, not {think_s}")
    results: list[RequestTiming | None] = [None] * len(messages)
    limit = asyncio.Semaphore(workload.concurrency) if workload.concurrency else None
    started = time.perf_counter()

    async def conversation(positions: range) -> None:
        if workload.mode == "open":
            arrival = workload.requests[positions[0]].arrival_s
            await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
        ids: tuple[int, ...] = system.token_ids if system is not None else ()
        text = system.text if system is not None else ""
        for turn, i in enumerate(positions):
            if turn and think_s:
                await asyncio.sleep(think_s)
            message, output = messages[i], workload.requests[i].output_tokens
            prompt = BuiltPrompt(text + message.text, ids + message.token_ids, len(ids) + message.num_tokens)
            if max_context is not None and prompt.num_tokens + output > max_context:
                return
            timing = await driver.send(prompt, output, request_timeout_s)
            results[i] = timing
            if on_done is not None:
                on_done(timing)
            if timing.error is not None:
                return
            answer = timing.output_token_ids
            if not answer and timing.output_text and encode is not None:
                answer = encode(timing.output_text)
            ids = prompt.token_ids + tuple(answer)
            text = prompt.text + timing.output_text

    async def limited(positions: range) -> None:
        if limit is None:
            await conversation(positions)
            return
        async with limit:
            await conversation(positions)

    await asyncio.gather(*(limited(p) for p in conversation_starts(len(messages), turns)))
    return [r for r in results if r is not None]
