"""engine.tokenizer.Tokenizer gives the same ids, text and chat prompts as transformers' AutoTokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError, ModelLoadError
from engine.tiny_model import ARCHS, make_tiny_model
from engine.tokenizer import Tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello, world!",
    "The café in Zürich serves a naïve crème brûlée.",
    "東京の数据模型 🚀🙂 are 100% ready… 😀 (unseen emoji)",
    "def f(x: int) -> int:\n    return x ** 2  # 🐍\n\n\tindented\r\nwindows line",
    "Numbers: 3.14159, 1,000,000 and -42; version 0.23.3",
    "   leading and trailing spaces   ",
    "",
    " ",
    "\n\n",
    "cafe\u0301 (decomposed accent)",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "한국어 서울 안녕하세요 Ελλάδα Москва",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi 🙂"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "東京 is?"},
        {"role": "assistant", "content": "A city."},
        {"role": "user", "content": "And café?"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "7 °C"},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        arch: make_tiny_model(root / arch, arch=arch, layers=1, hidden=32, heads=2, kv_heads=1)
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def pairs(model_dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {
        arch: (Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d))
        for arch, d in model_dirs.items()
    }


def _hf_chat_ids(hf: object, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_transformers(pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    for text in TEXTS:
        for special in (True, False):
            assert (
                ours.encode(text, add_special_tokens=special)
                == hf(text, add_special_tokens=special)["input_ids"]
            ), (
                text,
                special,
            )


@pytest.mark.parametrize("arch", ARCHS)
def test_bos_behaviour_per_family(pairs: dict, arch: str) -> None:
    ours, _ = pairs[arch]
    ids = ours.encode("Hello")
    if arch in ("llama", "mistral"):
        assert ours.bos_token == "<|endoftext|>" and ours.bos_token_id == 0
        assert ids[0] == 0 and ours.encode("Hello", add_special_tokens=False) == ids[1:]
    else:
        assert ours.bos_token is None and ours.bos_token_id is None
        assert ids == ours.encode("Hello", add_special_tokens=False) and 0 not in ids


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_matches_transformers(pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    rng = random.Random(0)
    sequences = [ours.encode(t) for t in TEXTS]
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(50)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    # Padded embedding rows have no token: they decode to nothing rather than failing.
    assert ours.decode([ours.vocab_size + 5]) == ""


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_and_sizes(pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    assert ours.vocab_size == len(hf) == 1024
    assert ours.eos_token == hf.eos_token == "<|im_end|>" and ours.eos_token_id == hf.eos_token_id == 2
    assert ours.eos_token_ids == {0, 2}  # generation_config: end of text and end of turn
    assert ours.pad_token_id == hf.pad_token_id == 0
    assert ours.special_token_ids == {0, 1, 2}
    ids = [*ours.encode(TEXTS[2]), 0, 1, 2]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens([5000]) == [None]


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_matches_transformers(pairs: dict, arch: str) -> None:
    ours, hf = pairs[arch]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            # The template carries BOS itself where the family has one, so encode without special tokens.
            assert ours.encode(text, add_special_tokens=False) == _hf_chat_ids(hf, messages, gen)
    # Tools and a tool-call round trip (the Hermes/Qwen layout), rendered the same as transformers renders them.
    text = ours.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)
    assert text == hf.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert '<tools>\n{"type": "function"' in text and "<tool_response>\n7 °C\n</tool_response>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in text
    text = ours.apply_chat_template(CONVERSATIONS[0])
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|endoftext|><|im_start|>user") is (arch in ("llama", "mistral"))


def test_chat_template_errors_are_request_errors(
    pairs: dict, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    ours, _ = pairs["qwen2"]
    with pytest.raises(InvalidRequestError, match="Unsupported role"):
        ours.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="empty"):
        ours.apply_chat_template([])
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template(["not a dict"])  # type: ignore[list-item]
    bare = _copy_with_config(model_dirs["qwen2"], tmp_path / "bare", chat_template=None)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_dir(bare).apply_chat_template(CONVERSATIONS[0])


def test_tokenizer_saved_by_transformers_loads_identically(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    backend = Tokenizer.from_dir(model_dirs["llama"]).backend
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
    template += "{% if add_generation_prompt %}{% generation %}[assistant]{% endgeneration %}{% endif %}"
    hf_made = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        chat_template=template,
    )  # fmt: skip
    hf_made.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()  # transformers 5 keeps it beside the config
    ours = Tokenizer.from_dir(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in [*TEXTS, "pad <|pad|> token"]:
        assert ours.encode(text) == hf(text)["input_ids"], text
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.pad_token_id == hf.pad_token_id and ours.vocab_size == len(hf)
    messages = [{"role": "user", "content": 'naïve "quote" 🚀'}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_special_token_missing_from_tokenizer_json_is_added(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = _copy_with_config(model_dirs["qwen2"], tmp_path / "pad", pad_token="<|pad|>")
    ours, hf = Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(out)
    assert ours.pad_token_id == hf.pad_token_id == 1024
    assert ours.encode("a<|pad|>b") == hf("a<|pad|>b")["input_ids"]


def test_legacy_special_tokens_map(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "legacy"
    shutil.copytree(model_dirs["llama"], out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "eos_token", "bos_token", "pad_token"):
        config.pop(key)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "generation_config.json").unlink()
    ours, hf = Tokenizer.from_dir(out), transformers.AutoTokenizer.from_pretrained(out)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert ours.eos_token_ids == {2}


def test_missing_tokenizer_json(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "missing"
    shutil.copytree(model_dirs["llama"], out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(out)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE"}}', "[]", ""])
def test_corrupt_tokenizer_json(model_dirs: dict[str, Path], tmp_path: Path, content: str) -> None:
    out = tmp_path / "corrupt"
    shutil.copytree(model_dirs["llama"], out)
    (out / "tokenizer.json").write_text(content)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: not a valid"):
        Tokenizer.from_dir(out)


def test_corrupt_tokenizer_config_and_template(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "badcfg"
    shutil.copytree(model_dirs["llama"], out)
    (out / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(out)
    broken = _copy_with_config(
        model_dirs["llama"], tmp_path / "badtpl", chat_template="{% for m in messages %}"
    )
    with pytest.raises(ModelLoadError, match="chat template is not valid Jinja"):
        Tokenizer.from_dir(broken)


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return dst
