"""One decoder-only transformer covering Llama 2/3, Mistral, Qwen2 and Qwen3.

The families differ only in switches read from config.json: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding
attention window (Mistral), Llama-3 RoPE scaling, and tied embeddings. Weights keep their Hugging Face names on disk;
q/k/v and gate/up are fused at load time so each layer runs two matmuls fewer per step.

Tensor parallel (engine/tensor_parallel/): loaded with a TPPlan, the model holds one rank's shard of every weight and
runs with that rank's head and column counts; with a TPComm it sums the row-parallel outputs (o_proj, down) and the
vocabulary-parallel embedding over the ranks, and gathers the logits.
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
from engine.tensor_parallel.comm import TPComm
from engine.tensor_parallel.plan import TPPlan

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
        plan: TPPlan | None = None,
        tp: TPComm | None = None,
    ) -> None:
        self.config = config  # this rank's shape under tensor parallelism (TPPlan.local_config)
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = RotaryEmbedding(config, max_positions, embed.device)
        self.scale = config.head_dim**-0.5
        self._q_size = config.num_heads * config.head_dim
        self._kv_size = config.num_kv_heads * config.head_dim
        self.plan = plan
        self.tp = tp if plan is not None and plan.world > 1 else None
        self.vocab_size = plan.config.vocab_size if plan is not None else config.vocab_size

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
        plan: TPPlan | None = None,
        tp: TPComm | None = None,
    ):
        tensors = {name: t for name, t in iter_tensors(model_dir)}
        return cls.from_state_dict(
            tensors, config, dtype, device, max_positions, source=str(model_dir), plan=plan, tp=tp
        )

    @classmethod
    def from_state_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        source: str = "checkpoint",
        plan: TPPlan | None = None,
        tp: TPComm | None = None,
    ) -> DecoderModel:
        weights = _WeightReader(tensors, config, dtype, device, source, plan)
        embed = weights.vocab_rows("model.embed_tokens.weight")
        layers = [weights.layer(i) for i in range(config.num_layers)]
        final_norm = weights.take("model.norm.weight", (config.hidden_size,))
        if config.tie_word_embeddings and "lm_head.weight" not in tensors:
            lm_head = Linear(embed)  # a packed copy where packing applies: the embedding keeps its own layout
        else:
            lm_head = Linear(weights.vocab_rows("lm_head.weight"))
        local = plan.local_config if plan is not None else config
        return cls(local, embed, layers, final_norm, lm_head, max_positions, plan, tp)

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
        h = self._embed(input_ids)
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
            attn_out = self._summed(layer.o_proj(attn.reshape(-1, self._q_size)))
            x = add_rms_norm_(h, attn_out, layer.post_norm, eps)
            mlp_out = self._summed(layer.down(silu_and_mul(layer.gate_up(x))))
            x = add_rms_norm_(h, mlp_out, next_norm, eps)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> fp32 logits [N, vocab] (matmul in the model dtype, as the reference does)."""
        if self.tp is None:
            return self.lm_head(hidden).float()
        if hidden.shape[0] == 0:  # every rank sees the same shapes, so every rank skips the gather alike
            return hidden.new_zeros(0, self.vocab_size, dtype=torch.float32)
        gathered = self.tp.all_gather_last(self.lm_head(hidden))  # every rank's vocabulary slice, in order
        return gathered[:, : self.vocab_size].float()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None or self.plan is None:
            return F.embedding(input_ids, self.embed)
        # Rows outside this rank's slice come out zero; the sum over ranks has every token's row exactly once.
        start = self.plan.vocab.start
        local = input_ids - start
        outside = (local < 0) | (local >= self.embed.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.embed)
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce_(h)

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: each rank's partial product, summed over the ranks."""
        return partial if self.tp is None else self.tp.all_reduce_(partial)


class _WeightReader:
    """Takes tensors out of a checkpoint by Hugging Face name, checking shapes and converting dtype/device."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        source: str,
        plan: TPPlan | None = None,
    ) -> None:
        self.tensors = tensors
        self.config = config
        self.dtype = dtype
        self.device = device
        self.source = source
        self.plan = plan

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(f"{self.source}: missing weight {name}")
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{self.source}: weight {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def vocab_rows(self, name: str) -> torch.Tensor:
        """The embedding or LM head: whole, or this rank's vocabulary slice."""
        whole = self.take(name, (self.config.vocab_size, self.config.hidden_size))
        return whole if self.plan is None else self.plan.vocab_rows(whole).contiguous()

    def layer(self, i: int) -> LayerWeights:
        cfg = self.config
        p = f"model.layers.{i}."
        hidden, d = cfg.hidden_size, cfg.head_dim
        q_size = cfg.num_heads * d
        qkv = self._qkv(
            [self.take(p + f"self_attn.{x}_proj.weight", (n, hidden)) for x, n in self._qkv_sizes]
        )
        qkv_bias = None
        if cfg.attention_bias:
            qkv_bias = self._qkv(
                [self.take(p + f"self_attn.{x}_proj.bias", (n,)) for x, n in self._qkv_sizes]
            )
        q_norm = k_norm = None
        if cfg.qk_norm:
            q_norm = self.take(p + "self_attn.q_norm.weight", (d,))
            k_norm = self.take(p + "self_attn.k_norm.weight", (d,))
        inter = cfg.intermediate_size
        gate = self.take(p + "mlp.gate_proj.weight", (inter, hidden))
        up = self.take(p + "mlp.up_proj.weight", (inter, hidden))
        o_proj = self.take(p + "self_attn.o_proj.weight", (hidden, q_size))
        down = self.take(p + "mlp.down_proj.weight", (hidden, inter))
        if self.plan is None:
            gate_up = torch.cat([gate, up])
        else:
            gate_up = self.plan.gate_up_rows(gate, up)
            o_proj = self.plan.o_proj_columns(o_proj).contiguous()
            down = self.plan.down_columns(down).contiguous()
        return LayerWeights(
            input_norm=self.take(p + "input_layernorm.weight", (hidden,)),
            qkv=Linear(qkv, qkv_bias),
            q_norm=q_norm,
            k_norm=k_norm,
            o_proj=Linear(o_proj),
            post_norm=self.take(p + "post_attention_layernorm.weight", (hidden,)),
            gate_up=Linear(gate_up),
            down=Linear(down),
        )

    @property
    def _qkv_sizes(self) -> list[tuple[str, int]]:
        cfg = self.config
        kv_size = cfg.num_kv_heads * cfg.head_dim
        return [("q", cfg.num_heads * cfg.head_dim), ("k", kv_size), ("v", kv_size)]

    def _qkv(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """q, k and v (weights or biases) fused: whole, or this rank's heads of each."""
        return torch.cat(parts) if self.plan is None else self.plan.qkv_rows(*parts).contiguous()
