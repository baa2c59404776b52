"""Shared test set-up: offline Hugging Face, the Triton interpreter without a GPU, bounded CPU threads, tiny models."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Must be set before any module with @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine.engine import LLMEngine  # noqa: E402
from engine.tiny_model import make_tiny_model  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
# Every model variant the parity tests cover: the four architectures plus Llama-3 RoPE scaling.
MODEL_VARIANTS = (*ARCHS, "llama3-rope")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small random checkpoint per variant (GQA 4:2 heads, 2 layers), made once per test session.

    Mistral gets a 24-token sliding window, so prompts of the parity tests (up to 300 tokens) exercise it; the
    llama3-rope variant's original context (256) is shorter than those prompts, so its frequency scaling matters.
    """
    root = tmp_path_factory.mktemp("models")
    shape = dict(layers=2, hidden=64, heads=4, kv_heads=2, seed=7)
    models = {arch: make_tiny_model(root / arch, arch=arch, **shape) for arch in ("llama", "qwen2", "qwen3")}
    models["mistral"] = make_tiny_model(root / "mistral", arch="mistral", sliding_window=24, **shape)
    models["llama3-rope"] = make_tiny_model(
        root / "llama3-rope", arch="llama", rope_scaling_llama3=True, **shape
    )
    return models


@pytest.fixture(scope="session")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def single_kv_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with one KV head for its four query heads: tensor-parallel ranks replicate it."""
    root = tmp_path_factory.mktemp("one-kv-head")
    return make_tiny_model(root / "llama", arch="llama", layers=2, hidden=64, heads=4, kv_heads=1, seed=9)


@pytest.fixture
def closing() -> Iterator[list[LLMEngine]]:
    """Engines a test appends here are closed after it (their tensor-parallel ranks stopped), also on failure."""
    engines: list[LLMEngine] = []
    try:
        yield engines
    finally:
        for engine in engines:
            engine.close()
