"""Writes small random-weight checkpoints in exact Hugging Face layout, for tests and demos that must not download.

`make_tiny_model` produces a directory that transformers' `AutoModelForCausalLM` / `AutoTokenizer` load as they would
a real Llama, Qwen2, Qwen3 or Mistral checkpoint: config.json, generation_config.json, safetensors weights (optionally
sharded with an index), and a byte-level BPE tokenizer trained on the bundled synthetic corpus and grown to the
model's vocab (engine/tiny_vocab.py). Everything is seeded, so the same arguments always give byte-identical files.
A recipe file records those arguments, so that a cached directory is reused only while it is what they would make.

This module must not import transformers: the engine ships without it. The config field names below are the ones
transformers 5 writes with `save_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from engine.tiny_vocab import fill_vocab

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # trained first, so they get ids 0, 1, 2
CORPUS_PATH = Path(__file__).with_name("data") / "corpus.txt"
# Raise whenever the same arguments start to give different files (2: the tokenizer fills the vocab), so that a
# directory cached by an older version is remade rather than reused.
FORMAT_VERSION = 2
RECIPE_FILE = "tiny_model_recipe.json"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# The values the real model families ship with, so that a loader that ignores a field shows up as a mismatch.
_ROPE_THETA = {"llama": 500000.0, "qwen2": 1000000.0, "qwen3": 1000000.0, "mistral": 1000000.0}
_RMS_NORM_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "mistral": 1e-5}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Llama 3 and Mistral prepend a BOS token when encoding; Qwen does not.
_ADDS_BOS = {"llama": True, "qwen2": False, "qwen3": False, "mistral": True}
# Qwen2's pre-tokenizer split: like GPT-2's, but digits one at a time and newlines kept with punctuation.
_QWEN_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# MistralConfig's default window. It is larger than any context the tests run, so HF and an engine that honours the
# window agree whether or not the window code is exercised; pass a small `sliding_window` to exercise it.
DEFAULT_MISTRAL_SLIDING_WINDOW = 4096

# Init scales, chosen so that a random model has clear top-1/top-2 logit margins (std 0.02, HF's default init, gives
# near-uniform logits and flaky greedy comparisons) while activations stay O(1) over long generations.
# Projection weights ~ N(0, gain^2 / fan_in); gain > 1 so that tied models do not just repeat the last token.
_LINEAR_GAIN = 1.5
_LOGIT_STD = 3.0  # std of the final logits for a unit-RMS final hidden state
_NORM_NOISE = 0.1  # RMSNorm weights ~ 1 + N(0, noise^2)
_BIAS_STD = 0.1

# ChatML with tools in the Hermes/Qwen format: the tools go in a system turn as JSON inside <tools></tools>, an
# assistant's calls as <tool_call>{"name", "arguments"}</tool_call>, tool results as user turns in <tool_response>.
# (Written for splitserve's test models; the words differ from any released template, the layout is the format's.)
_TOOLS_PREAMBLE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call the functions whose signatures are listed inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, answer with its name and arguments as a JSON object inside "
    '<tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function name>, "arguments": <arguments object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
)
_CHATML_BODY = (
    _TOOLS_PREAMBLE + "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (call['name'] | tojson) + ', \"arguments\": ' }}"
    "{%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] in ['system', 'user', 'assistant'] %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- raise_exception('Unsupported role ' + message['role'] + ': use system, user, assistant or tool') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_template(with_bos: bool) -> str:
    """A ChatML template; with_bos starts the prompt with bos_token, as Llama 3's template does."""
    return ("{{- bos_token }}" if with_bos else "") + _CHATML_BODY


def make_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 1024,
    seed: int = 0,
    intermediate: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
    shard_max_bytes: int | None = None,
    rope_scaling_llama3: bool = False,
    sliding_window: int | None = DEFAULT_MISTRAL_SLIDING_WINDOW,
    reuse: bool = False,
) -> Path:
    """Write a random-weight `arch` checkpoint with its tokenizer into `out_dir` (created if needed); return it.

    `vocab` is the model's vocab_size and the tokenizer's size: every id is a token with text (ValueError when the
    corpus cannot fill it). `intermediate` defaults to 8/3 * hidden rounded up to a multiple of 16.
    `tie_word_embeddings` defaults to False for llama/mistral and True for qwen2/qwen3. `sliding_window` applies to
    mistral only (the other families keep HF's sliding-window-off config); None writes a null window.
    With `reuse`, a directory whose recipe file matches these arguments and FORMAT_VERSION is returned as it is;
    any other is rewritten, so pass it only for a cache directory.
    """
    # First, while the arguments are the only locals: they are what the files depend on.
    recipe = {"format_version": FORMAT_VERSION} | {
        k: v for k, v in locals().items() if k not in ("out_dir", "reuse")
    }
    _validate(arch, hidden, heads, kv_heads, vocab, dtype, rope_scaling_llama3)
    out_dir = Path(out_dir)
    if reuse and _read_recipe(out_dir) == recipe:
        return out_dir
    tokenizer = train_tokenizer(vocab, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Gone while the files change, so that a run stopped halfway leaves a directory that is never reused.
    (out_dir / RECIPE_FILE).unlink(missing_ok=True)
    _write_tokenizer_files(out_dir, tokenizer, arch, max_position_embeddings)
    ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    tie = tie_word_embeddings if tie_word_embeddings is not None else arch in ("qwen2", "qwen3")
    config = _config(
        arch=arch,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        intermediate=intermediate or default_intermediate_size(hidden),
        max_position_embeddings=max_position_embeddings,
        tie=tie,
        dtype=dtype,
        rope_scaling_llama3=rope_scaling_llama3,
        sliding_window=sliding_window,
        bos_id=ids[ENDOFTEXT],
        eos_ids=[ids[ENDOFTEXT], ids[IM_END]],
    )
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": ids[ENDOFTEXT], "eos_token_id": config["eos_token_id"]},
    )
    tensors = init_weights(config, seed)
    save_weights({name: t.to(_DTYPES[dtype]) for name, t in tensors.items()}, out_dir, shard_max_bytes)
    _write_json(out_dir / RECIPE_FILE, recipe)
    return out_dir


def _read_recipe(out_dir: Path) -> dict[str, Any] | None:
    try:
        recipe = json.loads((out_dir / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or not JSON: not a directory to reuse
        return None
    return recipe if isinstance(recipe, dict) else None


def default_intermediate_size(hidden: int) -> int:
    """Llama's MLP sizing: 8/3 of hidden (SwiGLU's three matrices cost what a 4x MLP's two would), rounded up to 16."""
    return 16 * math.ceil(8 * hidden / 3 / 16)


def _validate(
    arch: str, hidden: int, heads: int, kv_heads: int, vocab: int, dtype: str, llama3: bool
) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    if (hidden // heads) % 2:
        raise ValueError(f"head_dim {hidden // heads} must be even for RoPE")
    if vocab < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab {vocab} is too small for a byte-level tokenizer (needs >= {256 + len(SPECIAL_TOKENS)})"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if llama3 and arch != "llama":
        raise ValueError("rope_scaling_llama3 applies to arch='llama' only")


# ---------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab: int, arch: str) -> Tokenizer:
    """A byte-level BPE with `arch`'s pre-tokenization and exactly `vocab` entries; deterministic and fast.

    Trained on the bundled corpus (the most frequent pairs first, down to pairs seen once), then grown to `vocab`
    by `fill_vocab` when the corpus runs out of pairs. Raises ValueError when `vocab` is beyond what it can fill.
    """
    tokenizer = Tokenizer(models.BPE())
    _set_pre_tokenization(tokenizer, arch)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One sequence per paragraph: train_from_iterator counts words, so the split only matters for speed.
    paragraphs = CORPUS_PATH.read_text(encoding="utf-8").split("\n\n")
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    tokenizer = fill_vocab(tokenizer, vocab, paragraphs)
    if _ADDS_BOS[arch]:
        # Like Llama 3's tokenizer.json: BOS is added by the post-processor, so HF and `tokenizers` agree.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{ENDOFTEXT} $A",
            pair=f"{ENDOFTEXT} $A {ENDOFTEXT} $B:1",
            special_tokens=[(ENDOFTEXT, _token_id(tokenizer, ENDOFTEXT))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _set_pre_tokenization(tokenizer: Tokenizer, arch: str) -> None:
    if arch in ("qwen2", "qwen3"):
        # transformers 5 rebuilds every qwen2 tokenizer as Qwen2Tokenizer (NFC, Qwen's split regex, then byte-level)
        # from the vocab and merges alone, so tokenizer.json must use exactly that pipeline for the two to agree.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"trained tokenizer lacks {token!r}")
    return token_id


def _write_tokenizer_files(out_dir: Path, tokenizer: Tokenizer, arch: str, model_max_length: int) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    adds_bos = _ADDS_BOS[arch]
    bos = ENDOFTEXT if adds_bos else None
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config: dict[str, Any] = {
        "added_tokens_decoder": {
            str(_token_id(tokenizer, t)): {"content": t, **special} for t in SPECIAL_TOKENS
        },
        "bos_token": bos,
        # Where the family has a BOS the template emits it (like Llama 3's), so chat prompts are encoded with
        # add_special_tokens=False, as transformers' apply_chat_template(tokenize=True) does.
        "chat_template": chat_template(with_bos=adds_bos),
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
    }
    if adds_bos:
        # Informational: with a tokenizer.json, BOS comes from its post-processor (transformers 5 ignores these).
        config |= {
            "add_bos_token": True,
            "add_eos_token": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    else:
        # What Qwen2.5 checkpoints ship; transformers 5 uses Qwen2Tokenizer for qwen2 whatever this says.
        config |= {"add_prefix_space": False, "errors": "replace", "split_special_tokens": False}
        config["tokenizer_class"] = "Qwen2Tokenizer"
    _write_json(out_dir / "tokenizer_config.json", dict(sorted(config.items())))
    special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT} | ({"bos_token": bos} if bos else {})
    _write_json(out_dir / "special_tokens_map.json", dict(sorted(special_map.items())))


# ------------------------------------------------------------------------------------------------------- config


def _config(
    *,
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    intermediate: int,
    max_position_embeddings: int,
    tie: bool,
    dtype: str,
    rope_scaling_llama3: bool,
    sliding_window: int | None,
    bos_id: int,
    eos_ids: list[int],
) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": _ROPE_THETA[arch], "rope_type": "default"}
    if rope_scaling_llama3:
        # transformers 5 keeps rope scaling and rope_theta together under `rope_parameters` (4.x: `rope_scaling`).
        rope = {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            # Small, so that the scaled low frequencies matter at tiny test lengths.
            "original_max_position_embeddings": 256,
            "rope_theta": _ROPE_THETA[arch],
            "rope_type": "llama3",
        }
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "dtype": dtype,
        "eos_token_id": eos_ids,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "model_type": arch,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": None,
        "rms_norm_eps": _RMS_NORM_EPS[arch],
        "rope_parameters": rope,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "vocab_size": vocab,
    }
    config.update(_family_fields(arch, layers, sliding_window))
    return dict(sorted(config.items()))


def _family_fields(arch: str, layers: int, sliding_window: int | None) -> dict[str, Any]:
    """The fields one family's HF config class adds on top of the shared ones."""
    if arch == "llama":
        return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if arch == "mistral":
        return {"sliding_window": sliding_window}
    # Qwen2 always has q/k/v biases (no attention_bias field); Qwen3 has none, but RMS-norms q and k per head.
    fields: dict[str, Any] = {
        "layer_types": ["full_attention"] * layers,
        "max_window_layers": 28,
        "sliding_window": None,
        "use_sliding_window": False,
    }
    if arch == "qwen3":
        fields["attention_bias"] = False
    return fields


# ------------------------------------------------------------------------------------------------------ weights


def init_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights under HF's parameter names, in a fixed order so the output is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim, inter = config["head_dim"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    tie = config["tie_word_embeddings"]
    # Tied: the embedding doubles as the LM head, so give it the LM head's scale; pre-norm blocks don't mind.
    embed_std = _LOGIT_STD / math.sqrt(hidden) if tie else 1.0
    tensors = {"model.embed_tokens.weight": _normal(gen, (vocab, hidden), embed_std)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        tensors[f"{prefix}.input_layernorm.weight"] = _norm_weight(gen, hidden)
        tensors.update(
            _attention_weights(
                gen, config["model_type"], f"{prefix}.self_attn", hidden, q_dim, kv_dim, head_dim
            )
        )
        tensors[f"{prefix}.post_attention_layernorm.weight"] = _norm_weight(gen, hidden)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = _linear(gen, inter, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = _linear(gen, inter, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = _linear(gen, hidden, inter)
    tensors["model.norm.weight"] = _norm_weight(gen, hidden)
    if not tie:
        tensors["lm_head.weight"] = _normal(gen, (vocab, hidden), _LOGIT_STD / math.sqrt(hidden))
    return tensors


def _attention_weights(
    gen: torch.Generator, arch: str, prefix: str, hidden: int, q_dim: int, kv_dim: int, head_dim: int
) -> dict[str, torch.Tensor]:
    tensors = {
        f"{prefix}.q_proj.weight": _linear(gen, q_dim, hidden),
        f"{prefix}.k_proj.weight": _linear(gen, kv_dim, hidden),
        f"{prefix}.v_proj.weight": _linear(gen, kv_dim, hidden),
        f"{prefix}.o_proj.weight": _linear(gen, hidden, q_dim),
    }
    if arch == "qwen2":
        for name, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            tensors[f"{prefix}.{name}.bias"] = _normal(gen, (dim,), _BIAS_STD)
    if arch == "qwen3":
        tensors[f"{prefix}.q_norm.weight"] = _norm_weight(gen, head_dim)
        tensors[f"{prefix}.k_norm.weight"] = _norm_weight(gen, head_dim)
    return tensors


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _linear(gen: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    return _normal(gen, (out_features, in_features), _LINEAR_GAIN / math.sqrt(in_features))


def _norm_weight(gen: torch.Generator, dim: int) -> torch.Tensor:
    return 1.0 + _normal(gen, (dim,), _NORM_NOISE)


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, shard_max_bytes: int | None = None) -> None:
    """Save as model.safetensors, or HF-style shards plus model.safetensors.index.json when shard_max_bytes is set."""
    metadata = {"format": "pt"}
    _remove_old_weights(out_dir)
    if shard_max_bytes is None:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=metadata)
        return
    shards = _split_shards(tensors, shard_max_bytes)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index_json)


def _remove_old_weights(out_dir: Path) -> None:
    # Rewriting a directory must not leave a previous run's shards or index for a loader to pick up.
    for path in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    # Greedy in insertion order, like HF: a tensor larger than the limit gets a shard of its own.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
