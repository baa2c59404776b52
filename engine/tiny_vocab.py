"""Grows a trained byte-level BPE to exactly a model's vocab size, so that every token id of a tiny model is real.

BPE training on the bundled corpus stops once every word of the corpus is a single token (about 1,800 entries with
Qwen's pre-tokenizer, 2,600 with GPT-2's), but a tiny model's vocab may be 4,096 or 32,000. Ids without a vocabulary
entry decode to "", and a random model samples every id, so its output would be mostly empty and token counts taken
from its text would be wrong.

`fill_vocab` appends merges that join two existing letter tokens into one word: " the" + "cache" -> " thecache".
Both pre-tokenizers in use (GPT-2's for Llama/Mistral, Qwen's) keep a run of letters, with an optional leading space,
in one piece, and a pair is taken only when the trained tokenizer splits the joined text into exactly that pair, so
each new token is what its own text encodes to. Pairs are tried most likely first under the corpus's token counts
(count(left) * count(right)), ties in a fixed order, so the result is deterministic. The merges rank after the
trained ones, so they never change how a corpus word is split, and the vocabulary and merge list stay a plain BPE
that transformers rebuilds identically (its Qwen2Tokenizer reads only the vocab and the merges).
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from tokenizers import Tokenizer, decoders

# Decodes one byte-level vocabulary entry ("Ġthe") to its text (" the"); invalid UTF-8 comes out as U+FFFD.
_BYTE_LEVEL = decoders.ByteLevel()
# Candidate pairs are checked by encoding their text in batches, which is many times faster than one by one.
_BATCH = 2048


class _Candidate(NamedTuple):
    """A vocabulary entry that may take part in a new merge, with its corpus count (negated: heapq pops smallest)."""

    neg_count: int
    token_id: int
    token: str


def fill_vocab(tokenizer: Tokenizer, vocab_size: int, corpus: Iterable[str]) -> Tokenizer:
    """A copy of the byte-level BPE `tokenizer` grown to `vocab_size` entries by extra merges (see the module doc).

    `corpus` is the text the tokenizer was trained on; it only orders the new merges. Returns `tokenizer` itself when
    it is already as large. Raises ValueError when the letter tokens cannot form enough new words.
    """
    data = json.loads(tokenizer.to_str())
    model: dict[str, Any] = data["model"]
    vocab: dict[str, int] = model["vocab"]
    if model.get("type") != "BPE" or len(vocab) != tokenizer.get_vocab_size(with_added_tokens=True):
        raise ValueError("fill_vocab needs a BPE tokenizer whose added tokens are part of its vocabulary")
    missing = vocab_size - len(vocab)
    if missing <= 0:
        return tokenizer
    counts: Counter[int] = Counter()
    for encoding in tokenizer.encode_batch(list(corpus), add_special_tokens=False):
        counts.update(encoding.ids)
    firsts, seconds = _letter_tokens(vocab, counts)
    # Checking pairs costs seconds per 100,000: refuse at once what even every pair could not fill.
    if len(firsts) * len(seconds) < missing:
        raise _too_large(vocab_size, len(vocab) + len(firsts) * len(seconds))
    new_merges = _new_merges(tokenizer, _likely_pairs(firsts, seconds), vocab, missing)
    if len(new_merges) < missing:
        raise _too_large(vocab_size, len(vocab) + len(new_merges))
    for left, right in new_merges:
        vocab[left + right] = len(vocab)
    model["merges"].extend([left, right] for left, right in new_merges)
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _too_large(vocab_size: int, most: int) -> ValueError:
    return ValueError(
        f"vocab {vocab_size} is too large for the tiny model's tokenizer: its corpus supports at most {most} tokens"
    )


def _letter_tokens(vocab: dict[str, int], counts: Counter[int]) -> tuple[list[_Candidate], list[_Candidate]]:
    """Tokens that can start a word (letters, maybe after one space) and those that can continue one (letters only)."""
    firsts, seconds = [], []
    for token, token_id in vocab.items():
        text = _BYTE_LEVEL.decode([token])
        letters = text.removeprefix(" ")
        if not letters.isalpha():  # also rejects "" and U+FFFD, the text of a partial UTF-8 sequence
            continue
        candidate = _Candidate(-counts[token_id], token_id, token)
        firsts.append(candidate)
        if letters == text:
            seconds.append(candidate)
    return sorted(firsts), sorted(seconds)


def _likely_pairs(
    firsts: list[_Candidate], seconds: list[_Candidate]
) -> Iterator[tuple[_Candidate, _Candidate]]:
    """Every pair (first, second), the highest count product first, ties by position: deterministic.

    Both lists are sorted by descending count, so the best pair not yet given is always the next one in some first's
    row: the heap holds one such frontier pair per row.
    """
    if not seconds:
        return
    heap = [(first.neg_count * -seconds[0].neg_count, row, 0) for row, first in enumerate(firsts)]
    heapq.heapify(heap)
    while heap:
        _, row, column = heapq.heappop(heap)
        if column + 1 < len(seconds):
            heapq.heappush(heap, (firsts[row].neg_count * -seconds[column + 1].neg_count, row, column + 1))
        yield firsts[row], seconds[column]


def _new_merges(
    tokenizer: Tokenizer, pairs: Iterator[tuple[_Candidate, _Candidate]], vocab: dict[str, int], wanted: int
) -> list[tuple[str, str]]:
    """Up to `wanted` merges from `pairs`, in order, whose joined token is new and is what its own text encodes to.

    A pair qualifies when the trained tokenizer splits the joined text into exactly that pair: the new merge ranks
    after every trained one, so it fires last and joins them. That split is unique, so no two merges make one token;
    and text that Qwen's NFC normalizer would change cannot split into the pair either.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < wanted:
        batch = list(itertools.islice(pairs, _BATCH))
        if not batch:
            break
        texts = [_BYTE_LEVEL.decode([left.token + right.token]) for left, right in batch]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        for (left, right), encoding in zip(batch, encodings, strict=True):
            # A token already in the vocabulary can still split in two (BPE builds it from other parts).
            if encoding.ids == [left.token_id, right.token_id] and left.token + right.token not in vocab:
                merges.append((left.token, right.token))
                if len(merges) == wanted:
                    break
    return merges
