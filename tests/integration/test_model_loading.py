"""A missing, incomplete or corrupt model directory fails with a message naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import ModelLoadError
from engine.tiny_model import make_tiny_model


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory does not exist"):
        LLMEngine(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        LLMEngine(tmp_path)


def test_corrupt_config(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_model(llama_dir, tmp_path / "m")
    (model / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config.json: not valid JSON"):
        LLMEngine(model)


def test_unsupported_architecture(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_model(llama_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        LLMEngine(model)


def test_truncated_safetensors(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_model(llama_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelLoadError, match=r"model.safetensors: truncated safetensors file \(expected \d+ bytes"
    ):
        LLMEngine(model)


def test_garbage_safetensors_header(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_model(llama_dir, tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{")
    with pytest.raises(ModelLoadError, match="corrupt safetensors header"):
        LLMEngine(model)


def test_missing_weights_file(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_model(llama_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors weights"):
        LLMEngine(model)


def test_missing_shard_named_by_the_index(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "sharded", arch="llama", shard_max_bytes=200_000)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=f"missing: {shards[-1].name}"):
        LLMEngine(model)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", arch="qwen2", seed=4)
    sharded = make_tiny_model(tmp_path / "sharded", arch="qwen2", seed=4, shard_max_bytes=150_000)
    prompts = [[5, 6, 7, 8], list(range(10, 60))]
    a = LLMEngine(single, EngineConfig(num_kv_blocks=32)).generate(prompts)
    b = LLMEngine(sharded, EngineConfig(num_kv_blocks=32)).generate(prompts)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_weight_with_wrong_shape(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"weight model.norm.weight has shape \(63,\), expected \(64,\)"):
        LLMEngine(model)
