"""Synthetic prompts of an exact token length, built with the served model's own tokenizer.

A prompt of N tokens is made by sampling N ids from a fixed list of word-like vocabulary entries (a token that
decodes to a short run of ASCII letters, usually with its leading space, and encodes back to itself alone), decoding
them to text, and re-encoding that text: words separated by spaces are pre-tokenized one by one, so the round trip
nearly always gives the same N ids. Where it does not (a merge across a word boundary, a normalizer), the encoding
is cut or extended and the round trip repeated; if that still misses after a few rounds, the closest attempt is
returned with its real length (`BuiltPrompt.num_tokens`), which is within +-1 of the request in practice.

Counts are of the encoding *without* special tokens: a server that adds BOS or a chat template sees a few more.
Only the `tokenizers` library is used (no transformers, no torch), so the harness stays light.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# A word-like token: 2-16 ASCII letters, with a leading space (byte-level BPE) or without (SentencePiece decodes
# a lone "▁word" to "word"). Letters only, so that neighbours never merge into numbers or punctuation runs.
_SPACED_WORD = re.compile(r" [A-Za-z]{2,16}")
_BARE_WORD = re.compile(r"[A-Za-z]{2,16}")
_MIN_SPACED = 64  # fewer spaced words than this: the tokenizer is not byte-level style; use bare words
_MAX_CANDIDATES = 4096  # the lowest ids (the most frequent merges) are plenty of variety
_SCAN_CHUNK = 8192
_MAX_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    text: str
    token_ids: tuple[int, ...]  # the encoding of `text` without special tokens
    requested_tokens: int  # what `build` was asked for

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def exact(self) -> bool:
        return self.num_tokens == self.requested_tokens


class PromptBuilder:
    """`build(n, index)` returns the same prompt for the same (tokenizer, seed, n, index), on any machine."""

    def __init__(self, tokenizer_path: str | Path, *, seed: int = 0) -> None:
        """`tokenizer_path`: a tokenizer.json, or a model directory that holds one."""
        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._init(Tokenizer.from_file(str(path)), seed)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, seed: int = 0) -> PromptBuilder:
        builder = cls.__new__(cls)
        builder._init(tokenizer, seed)
        return builder

    def _init(self, tokenizer: Tokenizer, seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self._tokenizer = tokenizer
        self._seed = seed
        self._candidates = _word_like_ids(tokenizer)

    @property
    def vocabulary_size(self) -> int:
        """How many word-like token ids prompts are sampled from."""
        return len(self._candidates)

    def encode(self, text: str) -> list[int]:
        """text's token ids, without special tokens (as prompts are counted)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def build(self, num_tokens: int, index: int) -> BuiltPrompt:
        """A prompt whose encoding (no special tokens) has `num_tokens` ids, deterministic per (seed, index)."""
        return self.build_many([num_tokens], first_index=index)[0]

    def build_many(self, num_tokens: Sequence[int], *, first_index: int = 0) -> list[BuiltPrompt]:
        """`build(n, first_index + i)` for the i-th n; the first round trip runs batched (threads in the tokenizer)."""
        if first_index < 0:
            raise ValueError(f"first_index must be >= 0, not {first_index}")
        for n in num_tokens:
            if n < 1:
                raise ValueError(f"num_tokens must be >= 1, not {n}")
        rngs = [np.random.default_rng([self._seed, first_index + i]) for i in range(len(num_tokens))]
        ids = [self._sample(rng, n) for rng, n in zip(rngs, num_tokens, strict=True)]
        texts = self._tokenizer.decode_batch(ids, skip_special_tokens=False)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [
            self._settle(rng, n, BuiltPrompt(text=text, token_ids=tuple(encoding.ids), requested_tokens=n))
            for rng, n, text, encoding in zip(rngs, num_tokens, texts, encodings, strict=True)
        ]

    def _settle(self, rng: np.random.Generator, num_tokens: int, attempt: BuiltPrompt) -> BuiltPrompt:
        """Cut or extend until the round trip gives `num_tokens` ids, or return the closest attempt."""
        best = attempt
        for _ in range(_MAX_ROUNDS - 1):
            if attempt.exact:
                break
            if attempt.num_tokens > num_tokens:
                ids = list(attempt.token_ids[:num_tokens])
            else:
                ids = [*attempt.token_ids, *self._sample(rng, num_tokens - attempt.num_tokens)]
            text = self._tokenizer.decode(ids, skip_special_tokens=False)
            encoded = self._tokenizer.encode(text, add_special_tokens=False).ids
            attempt = BuiltPrompt(text=text, token_ids=tuple(encoded), requested_tokens=num_tokens)
            if abs(attempt.num_tokens - num_tokens) < abs(best.num_tokens - num_tokens):
                best = attempt
        return best

    def _sample(self, rng: np.random.Generator, count: int) -> list[int]:
        return [int(i) for i in rng.choice(self._candidates, size=count)]


def _word_like_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Ids of word-like tokens that encode back to themselves alone; spaced words if there are enough."""
    special = set(tokenizer.get_added_tokens_decoder())
    spaced: list[int] = []
    bare: list[int] = []
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for first in range(0, vocab_size, _SCAN_CHUNK):
        ids = [i for i in range(first, min(first + _SCAN_CHUNK, vocab_size)) if i not in special]
        texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        words = [(i, t) for i, t in zip(ids, texts, strict=True) if _BARE_WORD.fullmatch(t.lstrip(" "))]
        encodings = tokenizer.encode_batch([t for _, t in words], add_special_tokens=False)
        for (token_id, text), encoding in zip(words, encodings, strict=True):
            if encoding.ids != [token_id]:
                continue
            (spaced if _SPACED_WORD.fullmatch(text) else bare).append(token_id)
        if len(spaced) >= _MAX_CANDIDATES:
            break
    chosen = spaced if len(spaced) >= _MIN_SPACED else spaced + bare
    if not chosen:
        raise ValueError("the tokenizer has no word-like tokens to build prompts from")
    return np.array(chosen[:_MAX_CANDIDATES], dtype=np.int64)
