"""The decoder's elementwise glue as fused C++ CPU kernels (csrc/fused_ops_cpu.cpp), with argument checks.

RMSNorm, residual add + RMSNorm, SiLU-and-mul and rotary embedding each run as one pass over the activations
instead of 3-8 torch ops with a fresh tensor each. On AVX-512 hosts the results are bit-identical to the torch
versions in engine/models/layers.py, which stay the reference and the fallback: engine/models/layers.py calls
these only where `usable(tensor)` holds (a CPU tensor, the extension built, ENABLED).

Measured on this project's 2-core Zen 4 VM (busy: other work ran alongside), bf16, the 156M Llama's shapes (hidden
1024, intermediate 2816, 16 + 4 heads of 64), median per call, torch ops / fused: at 24 tokens (a decode step)
rms_norm 34/13 us, residual add + rms_norm 42/12 us, silu_and_mul 219/105 us, rotary 131/22 us; at 1024 tokens
(a prefill chunk) 21/0.6 ms, 55/0.6 ms, 16.6/2.7 ms and 17.6/0.5 ms (torch's figures there include page faults
of its fresh temporaries on a loaded host).
"""

from __future__ import annotations

from types import ModuleType

import torch

from engine.kernels import cpu_native

# Module-level switch, for A/B timing against the torch ops (SPLITSERVE_NATIVE_KERNELS=0 also turns these off,
# with the decode-attention kernel).
ENABLED = True

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve tensors like x: on CPU, in a supported dtype, with the extension built."""
    return ENABLED and x.device.type == "cpu" and x.dtype in _DTYPES and cpu_native.native() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., D], any row strides, unit stride for D); returns a new contiguous
    tensor shaped like x."""
    _check_rows("rms_norm", x, weight)
    if x.dim() == 2:
        rows = x.unsqueeze(0)
    elif x.dim() == 3:
        rows = x
    else:  # flatten leading dims (a copy only where they cannot be viewed as one)
        rows = x.reshape(1, -1, x.shape[-1])
    return _native().rms_norm(rows, weight, float(eps)).view(x.shape)


def add_rms_norm_(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += delta in place (rounded to the dtype, as torch's add), then return rms_norm(residual).

    residual: [N, D] contiguous; delta: [N, D] with a unit stride for D.
    """
    _check_rows("add_rms_norm_", residual, weight)
    if residual.dim() != 2 or not residual.is_contiguous():
        raise ValueError("add_rms_norm_: residual must be a contiguous [N, D] tensor")
    if delta.shape != residual.shape or delta.dtype != residual.dtype or delta.stride(-1) != 1:
        raise ValueError(
            f"add_rms_norm_: delta {tuple(delta.shape)} {delta.dtype} must match residual "
            f"{tuple(residual.shape)} {residual.dtype} with a unit stride for its last dim"
        )
    return _native().add_rms_norm_(residual, delta, weight, float(eps))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([N, 2I], unit stride for the last dim); returns [N, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"silu_and_mul: expected [N, 2I] with a unit last stride, got {tuple(gate_up.shape)} "
            f"strides {gate_up.stride()}"
        )
    _check_dtype("silu_and_mul", gate_up)
    return _native().silu_and_mul(gate_up)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE: q [T, H, D], k [T, KVH, D] (unit stride for D), positions [T] int64 rows of the fp32
    tables cos, sin [P, D]. Returns new contiguous (q, k); a position outside the tables raises IndexError."""
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} are not [T, H, D]")
    dim = q.shape[2]
    if dim % 2 or q.stride(2) != 1 or k.stride(2) != 1 or k.dtype != q.dtype:
        raise ValueError(
            "rotary_embedding: q and k need one dtype, an even head_dim and a unit stride for it"
        )
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rotary_embedding: positions must be an integer tensor [{q.shape[0]}]")
    for table in (cos, sin):
        if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != dim:
            raise ValueError(f"rotary_embedding: tables must be float32 [P, {dim}]")
    _check_dtype("rotary_embedding", q)
    q_out, k_out = _native().rotary_embedding(
        q, k, positions.to(torch.int64).contiguous(), cos.contiguous(), sin.contiguous()
    )
    return q_out, k_out


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or x.device.type != "cpu":
        raise ValueError(
            f"{name}: expects a CPU float32/bfloat16/float16 tensor, got {x.dtype} on {x.device}"
        )


def _check_rows(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_dtype(name, x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.stride(-1) != 1:
        raise ValueError(f"{name}: x needs a non-empty last dim with unit stride, got strides {x.stride()}")
    if weight.shape != (x.shape[-1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(
            f"{name}: weight must be a contiguous [{x.shape[-1]}] {x.dtype} tensor, "
            f"got {tuple(weight.shape)} {weight.dtype}"
        )


def _native() -> ModuleType:
    module = cpu_native.native()
    if module is None:
        raise RuntimeError("the fused CPU kernels are not built (check fused.usable() first)")
    return module
