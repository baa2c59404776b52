"""How `splitserve bench --turns` builds each turn's prompt and when a conversation ends (ops/bench/conversations.py).

The driver here answers from a script instead of a server (tests/integration/test_bench.py runs conversations
against a live cluster): it records every prompt it was sent, so the context each turn carries can be checked exactly.
"""

from __future__ import annotations

import asyncio

import pytest

from ops.bench.conversations import conversation_starts, run_conversations
from ops.bench.metrics import RequestTiming
from ops.bench.prompts import BuiltPrompt
from ops.bench.workload import TraceRequest, Workload


class ScriptedServer:
    """Answers turn n of any conversation with n+1 copies of token 7 (text "x" each); fails the prompts listed."""

    name = "scripted"

    def __init__(self, fail_lengths: set[int] = frozenset(), text_only: bool = False) -> None:
        self.sent: list[BuiltPrompt] = []
        self.fail_lengths = fail_lengths
        self.text_only = text_only

    async def send(self, prompt: BuiltPrompt, output_tokens: int, timeout_s: float) -> RequestTiming:
        self.sent.append(prompt)
        error = "http_500: scripted" if prompt.num_tokens in self.fail_lengths else None
        ids = [] if self.text_only else [7] * output_tokens
        return RequestTiming(
            start=0.0, first_token=None if error else 0.1, token_times=[] if error else [0.1] * output_tokens,
            end=0.2, prompt_tokens=prompt.num_tokens, output_tokens=0 if error else output_tokens, error=error,
            output_token_ids=ids, output_text="" if error else "x" * output_tokens,
        )  # fmt: skip

    async def close(self) -> None:
        pass


def message(i: int, n: int) -> BuiltPrompt:
    return BuiltPrompt(text=f"<m{i}>", token_ids=tuple(range(100 * i, 100 * i + n)), requested_tokens=n)


def workload(outputs: list[int], concurrency: int = 2) -> Workload:
    return Workload(tuple(TraceRequest(0.0, 3, out) for out in outputs), "closed", concurrency)


def test_conversations_group_consecutive_requests() -> None:
    assert conversation_starts(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert conversation_starts(2, 1) == [range(0, 1), range(1, 2)]
    with pytest.raises(ValueError):
        conversation_starts(4, 0)


def test_each_turn_resends_the_system_prompt_earlier_turns_and_answers() -> None:
    server = ScriptedServer()
    system = BuiltPrompt(text="<sys>", token_ids=(1, 2), requested_tokens=2)
    messages = [message(i, 3) for i in range(1, 5)]
    timings = asyncio.run(run_conversations(workload([2, 4, 1, 5]), messages, server, turns=2, system=system))
    assert len(timings) == 4
    by_text = {p.text: p for p in server.sent}
    first = by_text["<sys><m1>"]
    assert first.token_ids == (1, 2, 100, 101, 102)
    second = by_text["<sys><m1>xx<m2>"]  # turn 1's answer: 2 tokens of 7, text "xx"
    assert second.token_ids == (1, 2, 100, 101, 102, 7, 7, 200, 201, 202)
    assert by_text["<sys><m3>x<m4>"].token_ids == (1, 2, 300, 301, 302, 7, 400, 401, 402)


def test_answers_that_come_back_as_text_are_tokenized_into_the_context() -> None:
    server = ScriptedServer(text_only=True)
    asyncio.run(
        run_conversations(
            workload([2, 1], concurrency=1), [message(1, 2), message(2, 2)], server, turns=2,
            encode=lambda text: [9] * len(text),
        )
    )  # fmt: skip
    assert server.sent[1].token_ids == (100, 101, 9, 9, 200, 201)


def test_a_conversation_ends_at_the_context_limit_or_a_failed_turn() -> None:
    long_talk = ScriptedServer()
    # Turn 1: 3 + 4 output = 7 fits 12; turn 2 would be 3 + 4 + 3 = 10 tokens + 4 output > 12: not sent.
    timings = asyncio.run(
        run_conversations(
            workload([4, 4, 4]), [message(i, 3) for i in range(3)], long_talk, turns=3, max_context=12
        )
    )
    assert [p.num_tokens for p in long_talk.sent] == [3] and len(timings) == 1

    failing = ScriptedServer(fail_lengths={3})
    timings = asyncio.run(
        run_conversations(workload([1, 1]), [message(1, 3), message(2, 3)], failing, turns=2)
    )
    assert len(failing.sent) == 1 and timings[0].error is not None  # turn 2 never sent after turn 1 failed
