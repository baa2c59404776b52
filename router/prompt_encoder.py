"""Tokenizing prompts without stopping the router's event loop.

A 7 MB prompt takes seconds to encode; done on the event loop it stalls every other request, stream and health
check for that long. So long inputs go to a small thread pool. `tokenizers` holds the GIL in `Tokenizer.encode` but
releases it in `encode_batch`, so the pool encodes through `encode_batch([text])` (same ids) and the loop keeps
running while a worker encodes. Short inputs (most requests) are encoded inline: a pool round trip costs more than
encoding them, and they must not queue behind a long prompt.

The pool is bounded twice: `max_workers` threads encode at once and at most `max_pending` jobs wait; beyond that
`EncoderBusy` is raised (the caller answers 429 / RESOURCE_EXHAUSTED), so a flood of long prompts cannot pile up
memory. A prompt longer than the caller's token limit raises `PromptTooLong` from the worker, before its ids are
turned into a Python list (millions of ints would hold the GIL for a noticeable time).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from engine.tokenizer import Tokenizer

INLINE_CHARS = 8 * 1024  # below this, encoding inline takes well under a millisecond
T = TypeVar("T")


class PromptTooLong(Exception):
    """The prompt has `tokens` tokens, at least the caller's limit."""

    def __init__(self, tokens: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens")
        self.tokens = tokens


class EncoderBusy(Exception):
    """Too many long prompts are already waiting to be tokenized."""


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, max_workers: int = 2, max_pending: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tokenize")
        self._pending = 0
        self._lock = threading.Lock()

    async def encode(
        self, text: str, *, add_special_tokens: bool = True, limit: int | None = None
    ) -> list[int]:
        """Token ids of text; PromptTooLong when there are `limit` or more; EncoderBusy when the pool is full."""
        if len(text) <= INLINE_CHARS:
            return self._encode(text, add_special_tokens, limit)
        return await self.run(self._encode, text, add_special_tokens, limit)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        limit: int | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the conversation (and the tools offered) rendered with the model's chat template (which
        holds any BOS)."""
        size = sum(len(str(m.get("content", ""))) for m in messages) + len(str(tools or ""))
        if size <= INLINE_CHARS:
            return self._encode_chat(messages, limit, tools)
        return await self.run(self._encode_chat, messages, limit, tools)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a pool thread; EncoderBusy when max_pending jobs are already queued or running."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise EncoderBusy(f"{self._pending} long prompts are already being tokenized")
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, text: str, add_special_tokens: bool, limit: int | None) -> list[int]:
        if not text:
            return []
        # encode_batch releases the GIL while it works; encode does not.
        [encoding] = self.tokenizer.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        if limit is not None and len(encoding) >= limit:
            raise PromptTooLong(len(encoding))
        return list(encoding.ids)

    def _encode_chat(
        self, messages: list[dict[str, Any]], limit: int | None, tools: list[dict[str, Any]] | None
    ) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return self._encode(rendered, False, limit)
