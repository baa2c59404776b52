"""Model and engine configuration: what a checkpoint's config.json says, and how the engine should run it."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError

# HF `architectures` / `model_type` values and the family they map to. Mistral is Llama's shape plus a sliding window.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling; `None` on ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 puts a bias on q/k/v projections
    qk_norm: bool  # Qwen3 RMS-normalises each head of q and k before RoPE
    sliding_window: (
        int | None
    )  # attend to at most this many most recent tokens (Mistral); None = full context
    hidden_act: str
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            layers = int(raw["num_hidden_layers"])
            vocab = int(raw["vocab_size"])
            intermediate = int(raw["intermediate_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: missing or invalid field {exc}") from exc
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        eos = raw.get("eos_token_id")
        sliding = raw.get("sliding_window")
        # Qwen2/3 configs carry a sliding_window that only applies when use_sliding_window is true.
        if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(raw)),
            rope_scaling=_rope_scaling(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            hidden_act="silu",
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_int_tuple(eos),
        )


def _int_tuple(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return ()


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`; 4.x keeps it at the top level.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(raw.get("rope_theta", 10000.0))


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"{source}: rope scaling type {kind!r} is not supported (supported: llama3)")
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: llama3 rope_scaling lacks field {exc}") from exc


class EngineRole(StrEnum):
    """Which phases this engine runs. One code path serves all three."""

    COLOCATED = "colocated"  # prompt and tokens on one engine
    PREFILL = "prefill"  # prompt only; hands the KV and the first token over
    DECODE = "decode"  # tokens only; KV arrives from a prefill engine


@dataclass(frozen=True, slots=True)
class RankExtension:
    """What each tensor-parallel worker rank also builds over its KV pool, by name (picklable: it crosses a
    process spawn): `module.factory(rank, kv_caches, **options)` (engine/tensor_parallel/rank_calls.py)."""

    module: str
    factory: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, rank: int, kv_caches: list[Any]) -> Any:
        return getattr(importlib.import_module(self.module), self.factory)(rank, kv_caches, **self.options)


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs a model: memory, batching and placement. Validated in __post_init__."""

    role: EngineRole = EngineRole.COLOCATED
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 512 * 1024**2
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill splits prompts to fit)
    max_num_seqs: int = 64  # requests in one step
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs on GPUs (engine/decode_graphs.py)
    # Ranks the model is split over (engine/tensor_parallel/): this process and tensor_parallel - 1 workers.
    tensor_parallel: int = 1
    tensor_parallel_timeout_s: float = 60.0  # a collective not done by then fails: a rank is gone or hung
    # What each worker rank also runs with its KV pool (engine/tensor_parallel/rank_calls.py); None: nothing.
    rank_extension: RankExtension | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.role = EngineRole(self.role)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
