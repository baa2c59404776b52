"""Incremental detokenization: turn a stream of generated token ids into a stream of text deltas.

Decoding each new token on its own is wrong for byte-level BPE (a token may hold part of a UTF-8 character) and for
tokenizers that drop a leading space at the start of a decode. Re-decoding the whole output per token is right but
quadratic. So, as vLLM and TGI do, we decode a short window twice: `prefix_offset..read_offset` (text already
emitted) and `prefix_offset..end`; the difference is the new text, held back while it ends in U+FFFD (an incomplete
character), and the window slides forward whenever something is emitted.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context: enough for any decoder's leading-space rule, short enough to be cheap.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed generated ids with `push`; call `flush` once at the end. `text` is everything emitted so far."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # A prompt tail that ends mid-character would glue prompt bytes onto the first output character; output
        # text is defined as decode(output ids), so then start without context.
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids = context
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # ids before this are already emitted (or are prompt context)
        self._prefix_text = self._decode(context)  # cached decode of ids[prefix_offset:read_offset]
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a trailing invalid byte sequence); call once at the end."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        return self._emit(new_text) if len(new_text) > len(self._prefix_text) else ""

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text) :]
        # The emitted ids become the next window's prefix; older ids are never decoded again.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._trim()
        self._chunks.append(delta)
        return delta

    def _trim(self) -> None:
        # Drop ids before the window so memory stays bounded on long generations.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
