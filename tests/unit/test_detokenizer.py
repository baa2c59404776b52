"""IncrementalDetokenizer streams exactly the text a full decode gives, never half a character, at small cost."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tiny_model import CORPUS_PATH, make_tiny_model
from engine.tokenizer import Tokenizer

FAMILIES = ("llama", "qwen2")  # the two tokenizer pipelines make_tiny_model writes (mistral/qwen3 share them)
TEXTS = [
    "東京の数据模型 🚀🙂 are ready",
    "Zürich café naïve — déjà vu! 🎉🎉🔥",
    "서울 안녕하세요, Ελλάδα, Москва ✨ 今天的天气很好。",
    "plain ascii only, with numbers 12345 and code: x = f(y) # ok",
    "🧠☕🎵🤖❤️👍",
]


class CountingTokenizer(Tokenizer):
    """Records the length of every decode, to check the detokenizer decodes small windows only."""

    def __init__(self, inner: Tokenizer) -> None:  # wraps a loaded tokenizer instead of reading files again
        self.__dict__.update(inner.__dict__)
        self.decode_lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("detok")
    return {
        arch: Tokenizer.from_dir(
            make_tiny_model(root / arch, arch=arch, layers=1, hidden=32, heads=2, kv_heads=1)
        )
        for arch in FAMILIES
    }


def _stream(
    tokenizer: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True
) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


@pytest.mark.parametrize("arch", FAMILIES)
def test_multibyte_text_streams_whole_characters(tokenizers: dict[str, Tokenizer], arch: str) -> None:
    tokenizer = tokenizers[arch]
    prompt = tokenizer.encode("Translate: ")
    held_back = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas, streamed = _stream(tokenizer, prompt, ids)
        assert streamed == tokenizer.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas), deltas
        held_back += deltas[:-1].count("")
    # The tokenizer has tokens holding part of a character, so some pushes must have held text back.
    assert held_back > 0
    assert any("\ufffd" in tokenizer.decode([i]) for i in tokenizer.encode("".join(TEXTS)))


@pytest.mark.parametrize("arch", FAMILIES)
def test_random_ids_concatenate_to_the_full_decode(tokenizers: dict[str, Tokenizer], arch: str) -> None:
    # Random ids can form invalid UTF-8, so the full decode may hold U+FFFD itself; the stream must still match.
    tokenizer = tokenizers[arch]
    rng = random.Random(1234)
    for _ in range(150):
        prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 12))]
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert _stream(tokenizer, prompt, ids, skip)[1] == tokenizer.decode(ids, skip_special_tokens=skip)


def test_prompt_ending_mid_character(tokenizers: dict[str, Tokenizer]) -> None:
    tokenizer = tokenizers["llama"]
    ids = tokenizer.encode("🚀🙂東京", add_special_tokens=False)
    partial = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:partial], ids[partial:]
    assert _stream(tokenizer, prompt, output)[1] == tokenizer.decode(output)


def test_special_tokens_skipped_or_kept(tokenizers: dict[str, Tokenizer]) -> None:
    tokenizer = tokenizers["qwen2"]
    ids = tokenizer.encode("Hi 🙂<|im_end|>\n<|im_start|>again", add_special_tokens=False)
    assert _stream(tokenizer, [], ids, skip=True)[1] == "Hi 🙂\nagain"
    assert _stream(tokenizer, [], ids, skip=False)[1] == "Hi 🙂<|im_end|>\n<|im_start|>again"


def test_flush_returns_held_back_bytes(tokenizers: dict[str, Tokenizer]) -> None:
    tokenizer = tokenizers["llama"]
    ids = tokenizer.encode("ok 東京", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.push(i) for i in ids[:cut])
    assert "\ufffd" not in streamed
    tail = detok.flush()
    assert streamed + tail == tokenizer.decode(ids[:cut]) and tail.endswith("\ufffd")
    assert detok.flush() == ""


@pytest.mark.parametrize("arch", FAMILIES)
def test_long_stream_decodes_small_windows(tokenizers: dict[str, Tokenizer], arch: str) -> None:
    counting = CountingTokenizer(tokenizers[arch])
    text = CORPUS_PATH.read_text(encoding="utf-8")[:6000]
    ids = counting.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    _, streamed = _stream(counting, counting.encode("Once"), ids)
    assert streamed == text
    # One small decode per token (two when text is emitted), never the whole sequence.
    assert max(counting.decode_lengths) <= 12
    assert len(counting.decode_lengths) <= 2 * len(ids) + 2


def test_detokenizer_without_prompt_or_output(tokenizers: dict[str, Tokenizer]) -> None:
    detok = IncrementalDetokenizer(tokenizers["llama"], [])
    assert detok.flush() == "" and detok.text == ""
