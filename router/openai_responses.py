"""OpenAI response bodies (and stream chunks) from the Generate streams of one HTTP request.

Each of a request's streams (prompt p, candidate j: stream p * best_of + j) gathers its messages into a StreamResult.
A final body returns, per prompt, its best `n` candidates (all of them unless best_of > n: then the n with the
highest cumulative logprob, OpenAI's best_of), indexed p * n + rank as OpenAI indexes a batch. With `echo` a choice's
text starts with its prompt and its logprobs with the prompt's tokens (the first has none: null); with `max_tokens: 0`
the one token the engine had to generate is dropped. vLLM's `prompt_logprobs` come as choices[].prompt_logprobs:
[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...] (rank when the token is among the alternatives).
A chat request with tools has its text parsed for calls (router/tool_parsers.py): `message.tool_calls`, or
`delta.tool_calls` as they complete in a stream, and finish_reason "tool_calls" when the answer ended with calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.tokenizer import Tokenizer
from router.openai_protocol import ParsedRequest
from router.tool_parsers import CallStream, Piece, call_stream, parse_whole
from splitserve.v1 import inference_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass
class StreamResult:
    stream: int
    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: pb.Usage | None = None

    def absorb(self, msg: pb.GenerateResponse) -> None:
        self.text.append(msg.text)
        self.logprobs.extend(msg.logprobs)
        self.prompt_logprobs.extend(msg.prompt_logprobs)
        self.completion_tokens += len(msg.token_ids)
        if msg.finish_reason:
            self.finish_reason = FINISH_REASONS.get(msg.finish_reason)
            self.usage = msg.usage

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def usage_charges(usages: Sequence[pb.Usage]) -> dict[str, Any]:
    """splitserve's fields of an OpenAI usage object: energy and cost, summed over the choices' requests.

    `charges` splits them by phase (and gives the machine seconds behind the costs); `power_source` is "measured",
    "modeled", "mixed" (nodes of both kinds) or None when no node charged anything."""
    fields = [f.name for f in pb.ChargeBreakdown.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE]
    charges: dict[str, Any] = {name: sum(getattr(u.charges, name) for u in usages) for name in fields}
    sources = {u.charges.power_source for u in usages if u.charges.power_source}
    charges["power_source"] = sources.pop() if len(sources) == 1 else "mixed" if sources else None
    return {
        "energy_joules": sum(u.energy_joules for u in usages),
        "cost_usd": sum(u.cost_usd for u in usages),
        "charges": charges,
    }


class ResponseBuilder:
    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer, model: str) -> None:
        self.parsed = parsed
        self.tokenizer = tokenizer
        self.model = model
        # One tool-call parser per stream when the request has tools (streaming only reads them).
        tools = parsed.tools
        self._call_streams: dict[int, CallStream] = (
            {i: call_stream(tools, parsed.tool_format) for i in range(parsed.streams)} if tools else {}
        )

    # ---- streaming ---------------------------------------------------------------------------------------------

    def role_chunk(self, stream: int) -> dict[str, Any]:
        return self._chunk(stream, {"role": "assistant", "content": ""})

    def echo_chunk(self, stream: int, prompt_logprobs: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
        """The prompt, sent before a stream's first generated text when the request asked for echo."""
        chunk = self._chunk(stream, {"content": self._prompt_text(stream)})
        if self.parsed.logprobs is not None:
            chunk["choices"][0]["logprobs"] = self._completion_logprobs(
                self._echoed(stream, prompt_logprobs, [])
            )
        return chunk

    def delta_chunk(self, stream: int, msg: pb.GenerateResponse) -> dict[str, Any]:
        generated = not self.parsed.echo_only
        finish_reason = FINISH_REASONS.get(msg.finish_reason)
        if self.parsed.tools is not None:
            delta, finish_reason = self._tool_delta(stream, msg.text, finish_reason)
        else:
            delta = {"content": msg.text if generated else ""}
        chunk = self._chunk(stream, delta)
        choice = chunk["choices"][0]
        choice["finish_reason"] = finish_reason
        if self.parsed.logprobs is not None and msg.logprobs and generated:
            choice["logprobs"] = self._logprobs(list(msg.logprobs))
        if self.parsed.prompt_logprobs is not None and msg.prompt_logprobs:
            choice["prompt_logprobs"] = self._vllm_prompt_logprobs(stream, msg.prompt_logprobs)
        return chunk

    def _tool_delta(
        self, stream: int, text: str, finish_reason: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """The delta of a chat stream with tools: content let through, tool calls as they complete."""
        calls = self._call_streams[stream]
        piece = calls.feed(text)
        if finish_reason is not None:
            piece += calls.finish()
        return _delta(piece), _with_calls(finish_reason, calls.called)

    def usage_chunk(self, results: list[StreamResult]) -> dict[str, Any]:
        return {**self._envelope(final=False), "choices": [], "usage": self._usage(results)}

    # ---- whole responses ---------------------------------------------------------------------------------------

    def final_body(self, results: list[StreamResult]) -> dict[str, Any]:
        parsed = self.parsed
        choices = []
        for prompt in range(len(parsed.prompts)):
            candidates = results[prompt * parsed.best_of : (prompt + 1) * parsed.best_of]
            if parsed.best_of > parsed.n:
                candidates = sorted(candidates, key=lambda r: r.cumulative_logprob, reverse=True)[: parsed.n]
            for rank, result in enumerate(candidates):
                choices.append(self._choice(prompt * parsed.n + rank, result))
        return {**self._envelope(final=True), "choices": choices, "usage": self._usage(results)}

    def _choice(self, index: int, result: StreamResult) -> dict[str, Any]:
        parsed = self.parsed
        generated = "" if parsed.echo_only else "".join(result.text)
        output = [] if parsed.echo_only else result.logprobs
        entry: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": result.finish_reason}
        if parsed.chat:
            entry["message"] = {"role": "assistant", "content": generated}
            if parsed.tools is not None:
                content, calls = parse_whole(call_stream(parsed.tools, parsed.tool_format), generated)
                entry["message"]["content"] = content
                if calls:
                    entry["message"]["tool_calls"] = calls
                    entry["finish_reason"] = _with_calls(result.finish_reason, True)
            if parsed.logprobs is not None:
                entry["logprobs"] = self._logprobs(output)
        else:
            entry["text"] = self._prompt_text(result.stream) + generated if parsed.echo else generated
            if parsed.logprobs is not None:
                items = self._echoed(result.stream, result.prompt_logprobs, output) if parsed.echo else output
                entry["logprobs"] = self._completion_logprobs(items)
        if parsed.prompt_logprobs is not None:
            entry["prompt_logprobs"] = self._vllm_prompt_logprobs(result.stream, result.prompt_logprobs)
        return entry

    def _usage(self, results: list[StreamResult]) -> dict[str, Any]:
        parsed = self.parsed
        prompt_tokens = sum(
            len(p) for p in parsed.prompts
        )  # once per prompt, however many choices, as OpenAI
        completion = 0 if parsed.echo_only else sum(r.completion_tokens for r in results)
        usages = [r.usage for r in results if r.usage]
        per_prompt = [
            results[p * parsed.best_of : (p + 1) * parsed.best_of] for p in range(len(parsed.prompts))
        ]
        cached = sum(
            max((r.usage.cached_prompt_tokens for r in rs if r.usage), default=0) for rs in per_prompt
        )
        ttfts = [u.ttft_seconds for u in usages]
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            # splitserve's own: the router-side time to first token, so a client can compare its view with ours.
            "server_ttft_s": min(ttfts) if ttfts else None,
            **usage_charges(usages),
        }

    # ---- pieces ------------------------------------------------------------------------------------------------

    def _envelope(self, final: bool) -> dict[str, Any]:
        parsed = self.parsed
        kind = ("chat.completion" if final else "chat.completion.chunk") if parsed.chat else "text_completion"
        return {"id": parsed.id, "object": kind, "created": parsed.created, "model": self.model}

    def _chunk(self, stream: int, delta: dict[str, Any]) -> dict[str, Any]:
        # Streaming never uses best_of > n, so a stream's index is its choice's index.
        choice: dict[str, Any] = {"index": stream, "logprobs": None, "finish_reason": None}
        if self.parsed.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        return {**self._envelope(final=False), "choices": [choice]}

    def _prompt_text(self, stream: int) -> str:
        prompt = self.parsed.prompt_of(stream)
        given = self.parsed.prompt_texts[prompt]
        return given if given is not None else self.tokenizer.decode(self.parsed.prompts[prompt])

    def _echoed(
        self, stream: int, prompt_logprobs: Sequence[pb.TokenLogprob], output: Sequence[pb.TokenLogprob]
    ) -> list[pb.TokenLogprob | int]:
        """The prompt's tokens (the first as a bare id: it has no logprob), then the generated ones."""
        prompt = self.parsed.prompts[self.parsed.prompt_of(stream)]
        return [prompt[0], *prompt_logprobs, *output]

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, items: Sequence[pb.TokenLogprob | int]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        total = 0
        for item in items:
            token = self._piece(item if isinstance(item, int) else item.token_id)
            tokens.append(token)
            offsets.append(total)
            total += len(token)
            if isinstance(item, int):
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(item.logprob)
                top = item.top[: self.parsed.logprobs or 0]  # prompt entries may carry more (prompt_logprobs)
                top_logprobs.append({self._piece(t.token_id): t.logprob for t in top})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def _logprobs(self, items: Sequence[pb.TokenLogprob]) -> dict[str, Any] | None:
        if not self.parsed.chat:
            return self._completion_logprobs(items)
        content = []
        for lp in items:
            token = self._piece(lp.token_id)
            top = [
                {
                    "token": self._piece(t.token_id),
                    "logprob": t.logprob,
                    "bytes": list(self._piece(t.token_id).encode()),
                }
                for t in lp.top
            ]
            content.append(
                {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()), "top_logprobs": top}
            )
        return {"content": content}

    def _vllm_prompt_logprobs(
        self, stream: int, prompt_logprobs: Sequence[pb.TokenLogprob]
    ) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None]
        for lp in prompt_logprobs:
            entry: dict[str, Any] = {}
            alternatives = lp.top[
                : self.parsed.prompt_logprobs or 0
            ]  # echo's logprobs may have asked for more
            ranks = {t.token_id: rank for rank, t in enumerate(alternatives, start=1)}
            entry[str(lp.token_id)] = {
                "logprob": lp.logprob,
                "rank": ranks.get(lp.token_id),
                "decoded_token": self._piece(lp.token_id),
            }
            for rank, alt in enumerate(alternatives, start=1):
                entry.setdefault(
                    str(alt.token_id),
                    {"logprob": alt.logprob, "rank": rank, "decoded_token": self._piece(alt.token_id)},
                )
            out.append(entry)
        return out


def _delta(piece: Piece) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if piece.content or not piece.tool_deltas:
        delta["content"] = piece.content
    if piece.tool_deltas:
        delta["tool_calls"] = piece.tool_deltas
    return delta


def _with_calls(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's finish_reason "tool_calls" for an answer that ended (not cut short) with calls."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
