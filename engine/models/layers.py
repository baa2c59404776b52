"""Building blocks of the decoder: RMSNorm, SiLU-and-mul and rotary position embeddings (with Llama-3 scaling).

Numerics follow the Hugging Face implementations step for step (norms in fp32, RoPE tables in fp32 cast to the
activation dtype) so that float32 outputs agree with the reference to rounding. On CPU, where the C++ kernels are
built, each op runs fused (engine/kernels/fused.py, the same roundings); the torch_* versions here are the
reference and the path for CUDA and SPLITSERVE_NATIVE_KERNELS=0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import ModelConfig, RopeScaling
from engine.kernels import fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise over the last dimension in fp32, then scale in the input dtype."""
    if fused.usable(x):
        return fused.rms_norm(x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def add_rms_norm_(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += delta (in place: the decoder's residual stream), then return rms_norm(residual)."""
    if fused.usable(residual):
        return fused.add_rms_norm_(residual, delta, weight, eps)
    residual.add_(delta)
    return torch_rms_norm(residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [T, 2I] gate_up projection (gate first)."""
    if fused.usable(gate_up):
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm in torch ops: the reference for the fused kernel."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Stretch low frequencies by `factor`, keep high ones, and interpolate in between (Llama 3.1's scheme)."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables for every position up to max_positions, applied with the rotate-half layout."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device) -> None:
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        inv_freq = 1.0 / (config.rope_theta**exponents)
        if config.rope_scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos()
        self.sin = angles.sin()

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D], positions: [T] -> rotated q, k (new tensors)."""
        if fused.usable(q):
            return fused.rotary_embedding(q, k, positions, self.cos, self.sin)
        return self.torch_apply(q, k, positions)

    def torch_apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """apply in torch ops: the reference for the fused kernel."""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
