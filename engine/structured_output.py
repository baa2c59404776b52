"""Grammar-constrained sampling (structured outputs) with xgrammar: the output follows a JSON schema, a regex, a
list of choices or an EBNF grammar, whatever the model would rather say.

A constrained request's life in the engine:
1. Intake (engine/request_intake.py) asks `GrammarCompiler.matcher_for` for a GrammarState: the constraint is compiled
   once per distinct constraint (a bounded LRU; an invalid schema, regex or grammar is an InvalidRequestError naming
   it), a fresh xgrammar GrammarMatcher is made, and the request's output so far (a resumed request's prior output)
   is replayed into it.
2. Every step, `mask_logits` sets the logits of the tokens the grammar forbids next to -inf, on the rows of
   constrained sequences only, before bias, penalties and sampling (engine/sampler.py).
3. Every token the request outputs goes through `GrammarState.accept` (engine.py's `_append_token`): a token sampled
   here, and also the first token a prefill engine sampled under the same grammar, admitted by a decode engine. So
   a decode engine's matcher (made at reserve, then fed the first token at admit) is in the prefill engine's state.
4. Once the grammar is complete the only token allowed is EOS (the engine's stop tokens), which ends the request with
   finish_reason stop; with ignore_eos it stays the only one allowed until max_tokens.
Ids beyond the tokenizer's vocabulary (a model's padded embedding rows) and special tokens are never allowed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.errors import InvalidRequestError
from engine.structured_spec import StructuredKind, StructuredOutput

if TYPE_CHECKING:
    import xgrammar

    from engine.tokenizer import Tokenizer

# Compiled grammars kept per engine; a JSON schema compiles in milliseconds to a second, a cache hit is free.
GRAMMAR_CACHE_SIZE = 256
# The mask a JSON object constraint compiles to: OpenAI's json_object asks for an object, not any JSON value.
_ANY_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarViolation(RuntimeError):
    """A token the request's grammar does not allow was recorded (the request fails; the others go on)."""


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("_stop_mask", "kind", "matcher")

    def __init__(
        self, matcher: xgrammar.GrammarMatcher, kind: StructuredKind, stop_mask: torch.Tensor
    ) -> None:
        self.matcher = matcher
        self.kind = kind
        self._stop_mask = stop_mask  # one bitmask row allowing only the stop tokens

    def accept(self, token_id: int) -> None:
        """Advance past an output token; GrammarViolation if the grammar does not allow it."""
        if self.matcher.is_terminated():  # only stop tokens are allowed after the stop token (ignore_eos)
            return
        if not self.matcher.accept_token(token_id):
            raise GrammarViolation(f"token {token_id} does not continue the request's {self.kind} constraint")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row]."""
        if self.matcher.is_terminated():
            bitmask[row] = self._stop_mask
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary and hands out matchers; safe to call from any thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self._stop_token_ids = sorted(t for t in stop_token_ids if 0 <= t < vocab_size)
        # xgrammar's compilers (for JSON kinds, and for the rest) and the bitmask row allowing only the stop tokens,
        # made on first use (xgrammar and its view of the vocabulary load lazily: most engines never see a
        # constrained request).
        self._made: _Compilers | None = None
        self._cache: OrderedDict[StructuredOutput, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def matcher_for(self, spec: StructuredOutput, output_so_far: Sequence[int] = ()) -> GrammarState:
        """A matcher at the start of spec's grammar, advanced past output_so_far (InvalidRequestError if they break
        it, or if the constraint does not compile)."""
        import xgrammar

        compiled = self.compile(spec)
        state = GrammarState(xgrammar.GrammarMatcher(compiled), spec.kind, self._ensure_compilers().stop_mask)
        for token in output_so_far:
            try:
                state.accept(token)
            except GrammarViolation as exc:
                raise InvalidRequestError(
                    f"the output already generated breaks the constraint: {exc}"
                ) from None
        return state

    def compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """spec's compiled grammar, from the cache when it was compiled before."""
        compilers = self._ensure_compilers()
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiled = _compile(
            compilers, spec
        )  # outside the lock: another thread may compile another constraint
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _ensure_compilers(self) -> _Compilers:
        import xgrammar

        with self._lock:
            if self._made is None:
                info = tokenizer_info(self._tokenizer, self.vocab_size, self._stop_token_ids)
                json_info = tokenizer_info(
                    self._tokenizer, self.vocab_size, self._stop_token_ids, without=_control_tokens(info)
                )
                # Our own LRU bounds the cache; xgrammar's would grow without limit.
                self._made = _Compilers(
                    xgrammar.GrammarCompiler(info, cache_enabled=False),
                    xgrammar.GrammarCompiler(json_info, cache_enabled=False),
                    _only(info.stop_token_ids, self.vocab_size),
                )
            return self._made


@dataclass(frozen=True, slots=True)
class _Compilers:
    general: xgrammar.GrammarCompiler
    # JSON never holds a raw control character (strings escape them, and the compact layout has no tabs or
    # newlines), but xgrammar 0.2.9 lets a string with maxLength take one: this compiler's vocabulary lacks every
    # token that contains one.
    json: xgrammar.GrammarCompiler
    stop_mask: torch.Tensor  # a bitmask row allowing exactly the stop tokens


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set to -inf, in place, the logits of every token that row's grammar forbids next; None rows are left alone."""
    import xgrammar

    rows = [row for row, state in enumerate(states) if state is not None]
    if not rows:
        return
    bitmask = xgrammar.allocate_token_bitmask(len(states), logits.shape[-1])
    for row in rows:
        state = states[row]
        assert state is not None
        state.fill(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int], without: Iterable[int] = ()
) -> xgrammar.TokenizerInfo:
    """xgrammar's view of the vocabulary: entry i is token i's vocabulary string ("" for ids the tokenizer lacks,
    special tokens and the ids `without`: xgrammar then never allows them), sized to the model's logits."""
    import xgrammar

    backend = tokenizer.backend
    banned = set(tokenizer.special_token_ids) | set(without)
    encoded = [""] * vocab_size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size and token_id not in banned:
            encoded[token_id] = token
    # How vocabulary strings map to bytes (byte-level, byte-fallback or raw) is read from tokenizer.json, as xgrammar
    # itself does for Hugging Face tokenizers.
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgrammar.TokenizerInfo(
        encoded,
        vocab_type=metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=stop_token_ids or None,  # none known: xgrammar looks for them in the vocabulary
        add_prefix_space=metadata["add_prefix_space"],
    )


def _compile(compilers: _Compilers, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
    # any_whitespace=False: JSON in the compact layout json.dumps writes. With free whitespace a model (a random one
    # for sure) may pad with newlines until max_tokens.
    try:
        if spec.kind == StructuredKind.JSON_SCHEMA:
            return compilers.json.compile_json_schema(spec.text, any_whitespace=False)
        if spec.kind == StructuredKind.JSON_OBJECT:
            return compilers.json.compile_json_schema(_ANY_OBJECT_SCHEMA, any_whitespace=False)
        if spec.kind == StructuredKind.REGEX:
            return compilers.general.compile_regex(spec.text)
        if spec.kind == StructuredKind.CHOICE:
            return compilers.general.compile_grammar(choice_grammar(spec.choices))
        return compilers.general.compile_grammar(spec.text)
    except (RuntimeError, ValueError) as exc:  # xgrammar reports a bad schema, regex or grammar as either
        what = {StructuredKind.JSON_SCHEMA: "JSON schema", StructuredKind.GRAMMAR: "grammar"}.get(
            spec.kind, spec.kind
        )
        raise InvalidRequestError(f"{spec.kind}: not a valid {what}: {_first_line(exc)}") from None


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly the choices (each a quoted literal, escaped as JSON escapes it)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _control_tokens(info: xgrammar.TokenizerInfo) -> list[int]:
    """Ids of the tokens whose text holds a control character (U+0000..U+001F)."""
    return [i for i, text in enumerate(info.decoded_vocab) if any(byte < 0x20 for byte in text)]


def _only(token_ids: Iterable[int], vocab_size: int) -> torch.Tensor:
    """A bitmask row (int32 words, 32 tokens each) allowing exactly token_ids."""
    words = [0] * ((vocab_size + 31) // 32)
    for token in token_ids:
        words[token // 32] |= 1 << (token % 32)
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32 holds bit 31 as the sign
    return torch.tensor(signed, dtype=torch.int32)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
