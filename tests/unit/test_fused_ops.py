"""The fused C++ CPU ops (engine/kernels/fused.py) against the torch ops they replace (engine/models/layers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.kernels import cpu_native, fused
from engine.models import layers
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(cpu_native.native() is None, reason="C++ CPU kernels not built")

# On AVX-512 hosts every op is bit-identical to torch's.
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit on AVX-512 hosts; elsewhere (plain C++ loops) within a couple of ulps of the dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if AVX512:
        assert torch.equal(actual, expected), f"{(actual != expected).sum()} of {actual.numel()} differ"
        return
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=2 * eps)


def test_fused_ops_serve_cpu_tensors() -> None:
    assert fused.usable(torch.zeros(2, dtype=torch.bfloat16))
    assert not fused.usable(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1024, 64, 100, 17, 5, 4096])
def test_rms_norm_matches_torch(dtype: torch.dtype, dim: int) -> None:
    torch.manual_seed(dim)
    x = torch.randn(37, dim, dtype=dtype) * 3
    weight = torch.randn(dim, dtype=dtype)
    assert_same(fused.rms_norm(x, weight, 1e-6), layers.torch_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_heads_in_a_strided_view(dtype: torch.dtype) -> None:
    # Qwen3's q_norm/k_norm: [T, H, D] views of the fused qkv output, normalised per head.
    torch.manual_seed(1)
    qkv = torch.randn(9, 24 * 128, dtype=dtype)
    q = qkv[:, : 16 * 128].view(9, 16, 128)
    weight = torch.randn(128, dtype=dtype)
    out = fused.rms_norm(q, weight, 1e-6)
    assert out.is_contiguous()
    assert_same(out, layers.torch_rms_norm(q, weight, 1e-6))
    one_dim = fused.rms_norm(qkv[0, :128], weight, 1e-6)  # other ranks are flattened to rows
    assert_same(one_dim, layers.torch_rms_norm(qkv[0, :128], weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1024, 33])
def test_add_rms_norm_updates_the_residual_and_matches_torch(dtype: torch.dtype, dim: int) -> None:
    torch.manual_seed(2)
    residual = torch.randn(50, dim, dtype=dtype) * 2
    delta = torch.randn(50, 2 * dim, dtype=dtype)[:, dim // 2 : dim // 2 + dim]  # strided rows
    weight = torch.randn(dim, dtype=dtype)
    expected_sum = residual + delta
    expected = layers.torch_rms_norm(expected_sum, weight, 1e-5)
    out = fused.add_rms_norm_(residual, delta, weight, 1e-5)
    assert_same(residual, expected_sum)  # the add is exact in every dtype: one rounding, as torch's
    assert_same(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2816, 64, 100, 48, 33])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    gate_up = torch.randn(41, 2 * width, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert_same(fused.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_rotary_embedding_matches_torch(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(head_dim)
    tokens, heads, kv_heads = 29, 16, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided, as in the decoder
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    rope = _rope(head_dim, 4000)
    positions = torch.randint(0, 4000, (tokens,))
    q_out, k_out = fused.rotary_embedding(q, k, positions, rope.cos, rope.sin)
    q_ref, k_ref = rope.torch_apply(q, k, positions)
    assert_same(q_out, q_ref)
    assert_same(k_out, k_ref)


def test_rotary_embedding_refuses_positions_outside_the_tables() -> None:
    rope = _rope(64, 100)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    with pytest.raises(IndexError, match="position 100"):
        fused.rotary_embedding(q, k, torch.tensor([0, 100, 5]), rope.cos, rope.sin)
    with pytest.raises(IndexError, match="position -1"):
        fused.rotary_embedding(q, k, torch.tensor([-1, 0, 5]), rope.cos, rope.sin)


def test_empty_batches() -> None:
    weight = torch.ones(64, dtype=torch.bfloat16)
    assert fused.rms_norm(torch.zeros(0, 64, dtype=torch.bfloat16), weight, 1e-6).shape == (0, 64)
    assert fused.silu_and_mul(torch.zeros(0, 128, dtype=torch.bfloat16)).shape == (0, 64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fused.rms_norm(torch.randn(4, 8).t(), torch.ones(4), 1e-6), "unit stride"),
        (lambda: fused.rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6), "weight"),
        (lambda: fused.rms_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6), "weight"),
        (
            lambda: fused.rms_norm(torch.randn(4, 8, dtype=torch.float64), torch.ones(8), 1e-6),
            "dtype|float64",
        ),
        (
            lambda: fused.add_rms_norm_(torch.randn(4, 16)[:, :8], torch.randn(4, 8), torch.ones(8), 1e-6),
            "residual",
        ),
        (lambda: fused.add_rms_norm_(torch.randn(4, 8), torch.randn(4, 7), torch.ones(8), 1e-6), "delta"),
        (lambda: fused.add_rms_norm_(torch.randn(4, 8), torch.randn(8, 4).t(), torch.ones(8), 1e-6), "delta"),
        (lambda: fused.silu_and_mul(torch.randn(4, 7)), r"\[N, 2I\]"),
        (lambda: fused.silu_and_mul(torch.randn(8, 4).t()), r"\[N, 2I\]"),
        (lambda: fused.silu_and_mul(torch.randn(4, 8, dtype=torch.float64)), "float64"),
    ],
)
def test_bad_arguments_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("q", "k", "positions", "message"),
    [
        (torch.randn(3, 4, 63), torch.randn(3, 2, 63), torch.zeros(3, dtype=torch.long), "even"),
        (torch.randn(3, 4, 64), torch.randn(2, 2, 64), torch.zeros(3, dtype=torch.long), r"\[T, H, D\]"),
        (torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.zeros(3), "integer"),
        (torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.zeros(4, dtype=torch.long), "integer"),
        (
            torch.randn(3, 4, 64),
            torch.randn(3, 2, 64, dtype=torch.bfloat16),
            torch.zeros(3, dtype=torch.long),
            "dtype",
        ),
    ],
)
def test_rotary_embedding_rejects_bad_arguments(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, message: str
) -> None:
    rope = _rope(q.shape[-1] + q.shape[-1] % 2, 10)
    with pytest.raises(ValueError, match=message):
        fused.rotary_embedding(q, k, positions, rope.cos, rope.sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layers_use_the_fused_ops_only_when_enabled(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    torch.manual_seed(3)
    x, weight = torch.randn(5, 256, dtype=dtype), torch.randn(256, dtype=dtype)
    calls: list[str] = []
    real = fused.rms_norm
    monkeypatch.setattr(fused, "rms_norm", lambda *a: calls.append("fused") or real(*a))
    layers.rms_norm(x, weight, 1e-6)
    monkeypatch.setattr(fused, "ENABLED", False)
    assert torch.equal(layers.rms_norm(x, weight, 1e-6), layers.torch_rms_norm(x, weight, 1e-6))
    assert calls == ["fused"]


def _rope(head_dim: int, max_positions: int) -> layers.RotaryEmbedding:
    config = ModelConfig(
        model_type="llama", vocab_size=100, hidden_size=4 * head_dim, intermediate_size=8, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
        attention_bias=False, qk_norm=False, sliding_window=None, hidden_act="silu", torch_dtype=None,
        bos_token_id=None, eos_token_ids=(),
    )  # fmt: skip
    return layers.RotaryEmbedding(config, max_positions, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_outputs_are_identical_with_and_without_the_fused_ops(
    monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], arch: str, dtype: str
) -> None:
    # Prefill and decode through every layer (Qwen3: per-head q/k norms): same tokens and the same logprobs.
    prompts = [[(7 * i + 3 * j) % 200 + 3 for j in range(n)] for i, n in enumerate((1, 17, 60))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        engine = LLMEngine(tiny_models[arch], EngineConfig(dtype=dtype, enable_prefix_caching=False))
        runs.append([(c.token_ids, c.logprobs) for c in engine.generate(prompts, params)])
    assert runs[0] == runs[1]
