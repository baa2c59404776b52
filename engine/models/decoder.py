"""One decoder-only transformer covering Llama 2/3, Mistral, Qwen2 and Qwen3.

The families differ only in switches read from config.json: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding
attention window (Mistral), Llama-3 RoPE scaling, and tied embeddings. Weights keep their Hugging Face names on disk;
q/k/v and gate/up are fused at load time so each layer runs two matmuls fewer per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import kernels
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.loader import iter_tensors
from engine.models.attention import AttentionBatch, paged_attention
from engine.models.layers import RotaryEmbedding, add_rms_norm_, rms_norm, silu_and_mul
from engine.models.linear import Linear

LayerHook = Callable[[int], None]


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # [(H + 2*KVH) * D, hidden], with Qwen2's bias
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear


class DecoderModel:
    """Weights plus a forward pass over a step's flattened tokens, reading and writing the paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: Linear,
        max_positions: int,
    ) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = RotaryEmbedding(config, max_positions, embed.device)
        self.scale = config.head_dim**-0.5
        self._q_size = config.num_heads * config.head_dim
        self._kv_size = config.num_kv_heads * config.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    def load(
        cls,
        model_dir: Path,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
    ):
        tensors = {name: t for name, t in iter_tensors(model_dir)}
        return cls.from_state_dict(tensors, config, dtype, device, max_positions, source=str(model_dir))

    @classmethod
    def from_state_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        source: str = "checkpoint",
    ) -> DecoderModel:
        weights = _WeightReader(tensors, config, dtype, device, source)
        embed = weights.take("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))
        layers = [weights.layer(i) for i in range(config.num_layers)]
        final_norm = weights.take("model.norm.weight", (config.hidden_size,))
        if config.tie_word_embeddings and "lm_head.weight" not in tensors:
            lm_head = Linear(embed)  # a packed copy where packing applies: the embedding keeps its own layout
        else:
            lm_head = Linear(weights.take("lm_head.weight", (config.vocab_size, config.hidden_size)))
        return cls(config, embed, layers, final_norm, lm_head, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor],
        on_layer_stored: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run the step's T tokens through every layer; returns final hidden states [T, hidden].

        on_layer_stored(i) is called as soon as layer i's new K/V are in the cache, before its attention runs,
        so a transport can ship that layer while the rest of the model computes.
        """
        cfg = self.config
        eps = cfg.rms_norm_eps
        # h is the residual stream, updated in place: each add_rms_norm_ adds a sublayer's output to it and
        # normalises the sum for the next sublayer (on CPU one fused kernel, engine/kernels/fused.py).
        h = F.embedding(input_ids, self.embed)
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        x = rms_norm(h, self.layers[0].input_norm if self.layers else self.final_norm, eps)
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms, strict=True)):
            qkv = layer.qkv(x)
            q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
            q = q.view(-1, cfg.num_heads, cfg.head_dim)
            k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = rms_norm(q, layer.q_norm, eps)
                k = rms_norm(k, layer.k_norm, eps)
            q, k = self.rope.apply(q, k, positions)
            kernels.store_kv(k, v, kv_caches[i], batch.slot_mapping)
            if on_layer_stored is not None:
                on_layer_stored(i)
            attn = paged_attention(q, k, v, kv_caches[i], batch, self.scale)
            x = add_rms_norm_(h, layer.o_proj(attn.reshape(-1, self._q_size)), layer.post_norm, eps)
            mlp_out = layer.down(silu_and_mul(layer.gate_up(x)))
            x = add_rms_norm_(h, mlp_out, next_norm, eps)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> fp32 logits [N, vocab] (matmul in the model dtype, as the reference does)."""
        return self.lm_head(hidden).float()


class _WeightReader:
    """Takes tensors out of a checkpoint by Hugging Face name, checking shapes and converting dtype/device."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        source: str,
    ) -> None:
        self.tensors = tensors
        self.config = config
        self.dtype = dtype
        self.device = device
        self.source = source

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"{self.source}: missing weight {name}")
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{self.source}: weight {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def layer(self, i: int) -> LayerWeights:
        cfg = self.config
        p = f"model.layers.{i}."
        hidden, d = cfg.hidden_size, cfg.head_dim
        q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        qkv = torch.cat(
            [
                self.take(p + "self_attn.q_proj.weight", (q_size, hidden)),
                self.take(p + "self_attn.k_proj.weight", (kv_size, hidden)),
                self.take(p + "self_attn.v_proj.weight", (kv_size, hidden)),
            ]
        )
        qkv_bias = None
        if cfg.attention_bias:
            qkv_bias = torch.cat(
                [
                    self.take(p + "self_attn.q_proj.bias", (q_size,)),
                    self.take(p + "self_attn.k_proj.bias", (kv_size,)),
                    self.take(p + "self_attn.v_proj.bias", (kv_size,)),
                ]
            )
        q_norm = k_norm = None
        if cfg.qk_norm:
            q_norm = self.take(p + "self_attn.q_norm.weight", (d,))
            k_norm = self.take(p + "self_attn.k_norm.weight", (d,))
        inter = cfg.intermediate_size
        gate_up = torch.cat(
            [
                self.take(p + "mlp.gate_proj.weight", (inter, hidden)),
                self.take(p + "mlp.up_proj.weight", (inter, hidden)),
            ]
        )
        return LayerWeights(
            input_norm=self.take(p + "input_layernorm.weight", (hidden,)),
            qkv=Linear(qkv, qkv_bias),
            q_norm=q_norm,
            k_norm=k_norm,
            o_proj=Linear(self.take(p + "self_attn.o_proj.weight", (hidden, q_size))),
            post_norm=self.take(p + "post_attention_layernorm.weight", (hidden,)),
            gate_up=Linear(gate_up),
            down=Linear(self.take(p + "mlp.down_proj.weight", (hidden, inter))),
        )
