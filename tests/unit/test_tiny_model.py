"""make_tiny_model writes checkpoints that transformers loads exactly, with logits clear enough to compare greedily."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.tiny_model import (
    ARCHS,
    FORMAT_VERSION,
    RECIPE_FILE,
    default_intermediate_size,
    make_tiny_model,
    train_tokenizer,
)
from engine.tokenizer import Tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

EXPECT_TIED = {"llama": False, "qwen2": True, "qwen3": True, "mistral": False}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # These models are tiny: a second thread only adds synchronisation, which costs seconds on a busy 2-core box.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ARCHS}


def _load_hf(model_dir: Path, **kwargs: object) -> tuple[torch.nn.Module, dict]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True, **kwargs
    )
    return model.eval(), info


def _top2_gaps(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.float().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).flatten()


def _random_prompts(batch: int, length: int, vocab: int = 1024, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_every_tensor(checkpoints: dict[str, Path], arch: str) -> None:
    model, info = _load_hf(checkpoints[arch])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # HF really uses the file's tensors (not a fresh init): compare one by name.
    saved = load_file(checkpoints[arch] / "model.safetensors")
    hf_params = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(hf_params[name], saved[name]), name
    assert (
        type(model).__name__
        == json.loads((checkpoints[arch] / "config.json").read_text())["architectures"][0]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_config_matches_the_shape_asked_for(checkpoints: dict[str, Path], arch: str) -> None:
    model, _ = _load_hf(checkpoints[arch])
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (2, 16, 1024)
    assert cfg.intermediate_size == default_intermediate_size(64) == 176
    assert cfg.tie_word_embeddings is EXPECT_TIED[arch]
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is EXPECT_TIED[
        arch
    ]
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) is (arch == "qwen2")
    assert (attn.o_proj.bias is None) and model.model.layers[0].mlp.gate_proj.bias is None
    assert hasattr(attn, "q_norm") is (arch == "qwen3")
    if arch == "qwen3":
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    if arch == "mistral":
        assert cfg.sliding_window == 4096
    assert cfg.bos_token_id == 0 and list(cfg.eos_token_id) == [0, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_config_reads_the_same_values(checkpoints: dict[str, Path], arch: str) -> None:
    cfg = ModelConfig.from_dir(checkpoints[arch])
    assert (cfg.model_type, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (arch, 2, 16, 176)
    assert cfg.tie_word_embeddings is EXPECT_TIED[arch]
    assert cfg.attention_bias is (arch == "qwen2") and cfg.qk_norm is (arch == "qwen3")
    assert cfg.sliding_window == (4096 if arch == "mistral" else None)
    assert cfg.rope_theta == (500000.0 if arch == "llama" else 1000000.0) and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (0, 2) and cfg.torch_dtype == "float32"


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_finite_with_clear_top1_margins(checkpoints: dict[str, Path], arch: str) -> None:
    model, _ = _load_hf(checkpoints[arch])
    with torch.no_grad():
        logits = model(_random_prompts(4, 32)).logits
    assert torch.isfinite(logits).all()
    gaps = _top2_gaps(logits)
    # HF's own init (std 0.02) gives median gaps ~1e-4; greedy comparisons need margins far above fp32 noise.
    assert gaps.median() > 0.2, gaps.median()
    assert (gaps < 1e-3).float().mean() < 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_stays_finite_and_varied(checkpoints: dict[str, Path], arch: str) -> None:
    model, _ = _load_hf(checkpoints[arch])
    prompts = _random_prompts(2, 8, seed=2)
    with torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=64, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0,
        )  # fmt: skip
        hidden = model(out.sequences, output_hidden_states=True).hidden_states
    logits = torch.stack(out.logits, dim=1)
    assert torch.isfinite(logits).all() and all(torch.isfinite(h).all() for h in hidden)
    assert max(h.abs().max().item() for h in hidden) < 1000
    assert _top2_gaps(logits).median() > 0.2
    generated = out.sequences[:, 8:]
    assert min(len(set(row.tolist())) for row in generated) >= 5, (
        "a random model should not collapse to one token"
    )


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    digests = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = make_tiny_model(tmp_path / name, arch="qwen3", seed=seed)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    assert digests[0]["model.safetensors"] != digests[2]["model.safetensors"]
    assert digests[0]["tokenizer.json"] == digests[2]["tokenizer.json"]


def test_safetensors_metadata_and_dtype(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "bf16", arch="llama", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 - safe_open has no __iter__
    model, info = _load_hf(out, dtype="auto")
    assert not info["missing_keys"] and model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(_random_prompts(1, 16)).logits).all()


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", arch="qwen2", seed=3)
    sharded = make_tiny_model(tmp_path / "sharded", arch="qwen2", seed=3, shard_max_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    assert [f.name for f in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    model_a, _ = _load_hf(single)
    model_b, info = _load_hf(sharded)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    prompts = _random_prompts(1, 16)
    with torch.no_grad():
        assert torch.equal(model_a(prompts).logits, model_b(prompts).logits)


def test_rewriting_a_directory_removes_stale_weights(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, arch="llama", shard_max_bytes=50_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    make_tiny_model(tmp_path, arch="llama")
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_llama3_rope_scaling_is_active_in_hf(tmp_path: Path) -> None:
    scaled = make_tiny_model(tmp_path / "scaled", arch="llama", rope_scaling_llama3=True)
    plain = make_tiny_model(tmp_path / "plain", arch="llama")
    params = json.loads((scaled / "config.json").read_text())["rope_parameters"]
    assert params["rope_type"] == "llama3" and params["original_max_position_embeddings"] == 256
    model, info = _load_hf(scaled)
    assert not info["missing_keys"]
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, _llama3_inv_freq(500000.0, 16, 8.0, 1.0, 4.0, 256), rtol=1e-5)
    plain_freq = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert not torch.allclose(inv_freq, plain_freq)
    # Same weights: outputs agree at position 0 (no rotation) and differ later.
    plain_model, _ = _load_hf(plain)
    prompts = _random_prompts(1, 64)
    with torch.no_grad():
        a, b = model(prompts).logits, plain_model(prompts).logits
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5) and not torch.allclose(a[:, -1], b[:, -1], atol=1e-3)
    cfg = ModelConfig.from_dir(scaled)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0


def _llama3_inv_freq(
    theta: float, dim: int, factor: float, low: float, high: float, orig: int
) -> torch.Tensor:
    # Written from the Llama 3.1 description: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float32)


def test_small_mistral_window_is_honoured_by_hf(tmp_path: Path) -> None:
    windowed = make_tiny_model(tmp_path / "w8", arch="mistral", sliding_window=8)
    full = make_tiny_model(tmp_path / "full", arch="mistral", sliding_window=None)
    assert json.loads((full / "config.json").read_text())["sliding_window"] is None
    assert ModelConfig.from_dir(windowed).sliding_window == 8
    prompts = _random_prompts(1, 24)
    with torch.no_grad():
        a, b = _load_hf(windowed)[0](prompts).logits, _load_hf(full)[0](prompts).logits
    # Position p attends to keys p-7..p: identical to full attention up to p = 7, different after.
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.fixture(scope="module")
def vocab_4096(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Far more ids than the corpus's BPE training yields (under 2,600): the rest are filled by tiny_vocab.
    root = tmp_path_factory.mktemp("vocab4096")
    return {
        arch: make_tiny_model(root / arch, arch=arch, layers=1, hidden=32, heads=2, kv_heads=1, vocab=4096)
        for arch in ARCHS
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vocab", [1024, 4096])
def test_every_id_is_a_token_with_text(
    checkpoints: dict[str, Path], vocab_4096: dict[str, Path], arch: str, vocab: int
) -> None:
    model_dir = checkpoints[arch] if vocab == 1024 else vocab_4096[arch]
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == vocab == ours.vocab_size == len(hf)
    assert len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]) == vocab
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == vocab
    for token_id in range(vocab):
        text = ours.decode([token_id], skip_special_tokens=False)
        assert text, f"id {token_id} decodes to nothing"
        assert hf.decode([token_id], skip_special_tokens=False) == text, token_id
    # Special tokens keep their ids, and config.json's BOS/EOS still name them.
    assert ours.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert config["bos_token_id"] == 0 and config["eos_token_id"] == [0, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_filled_tokens_encode_back_to_themselves_as_in_transformers(
    vocab_4096: dict[str, Path], arch: str
) -> None:
    ours = Tokenizer.from_dir(vocab_4096[arch])
    hf = transformers.AutoTokenizer.from_pretrained(vocab_4096[arch])
    for token_id in range(3000, 4096):  # all filled: training stops below 2,600
        text = ours.decode([token_id])
        assert ours.encode(text, add_special_tokens=False) == [token_id], (token_id, text)
        assert hf(text, add_special_tokens=False)["input_ids"] == [token_id], (token_id, text)
    # What a random model emits: any mix of ids, decoded, then re-encoded by a client.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, 4096) for _ in range(rng.randint(1, 30))]
        text = ours.decode(ids)
        assert hf.decode(ids) == text
        for special in (True, False):
            assert (
                ours.encode(text, add_special_tokens=special)
                == hf(text, add_special_tokens=special)["input_ids"]
            )


def test_large_vocab_is_filled_the_same_in_every_process() -> None:
    tokenizer = train_tokenizer(32000, "qwen2")
    assert tokenizer.get_vocab_size() == 32000
    assert all(tokenizer.decode([i]) for i in range(3, 32000, 7))
    # Another process with other hash seeds: nothing may depend on set or dict iteration order.
    script = "from engine.tiny_model import train_tokenizer; print(train_tokenizer(32000, 'qwen2').to_str())"
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    assert other.stdout.strip() == tokenizer.to_str()


def test_vocab_beyond_what_the_corpus_can_fill_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab 10000000 is too large .* at most \d+ tokens"):
        make_tiny_model(tmp_path / "huge", vocab=10_000_000)
    assert not (tmp_path / "huge").exists()
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "make-tiny-model", str(tmp_path / "huge"), "--vocab", "10000000"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "vocab 10000000 is too large" in result.stderr, result.stderr


def _cached(model_dir: Path, seed: int = 0) -> Path:
    return make_tiny_model(
        model_dir, layers=1, hidden=32, heads=2, kv_heads=1, vocab=2048, seed=seed, reuse=True
    )


def test_reuse_keeps_a_matching_cache_and_remakes_any_other(tmp_path: Path) -> None:
    model_dir = _cached(tmp_path / "cache")
    sentinel = model_dir / "generation_config.json"
    fresh = sentinel.read_text()
    sentinel.write_text("{}")
    _cached(model_dir)
    assert sentinel.read_text() == "{}", "a cache made with the same arguments is reused as it is"
    _cached(model_dir, seed=1)
    assert sentinel.read_text() == fresh, "other arguments remake it"
    # Caches written before the tokenizer filled the vocab have no recipe; later ones may have an older version.
    _cached(model_dir)
    recipe = model_dir / RECIPE_FILE
    older = {**json.loads(recipe.read_text()), "format_version": FORMAT_VERSION - 1}
    for make_stale in (recipe.unlink, lambda: recipe.write_text(json.dumps(older))):
        sentinel.write_text("{}")
        make_stale()
        _cached(model_dir)
        assert sentinel.read_text() == fresh
        assert json.loads(recipe.read_text())["format_version"] == FORMAT_VERSION


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="kv_heads"):
        make_tiny_model(tmp_path, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="llama"):
        make_tiny_model(tmp_path, arch="qwen2", rope_scaling_llama3=True)
