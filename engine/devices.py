"""Choosing the device and dtype a model runs in, with a clear refusal for combinations that cannot work well."""

from __future__ import annotations

import torch

from engine.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {name!r} (use cpu or cuda[:N])") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device type {device.type!r} is not supported (use cpu or cuda[:N])")
    return device


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype where the device runs it well; float16 on CPU is refused (far too slow)."""
    name = _ALIASES.get(requested, requested)
    if name == "auto":
        name = checkpoint_dtype if checkpoint_dtype in _DTYPES else "float32"
        if name == "float16" and device.type == "cpu":
            name = "bfloat16"
    if name not in _DTYPES:
        raise InvalidRequestError(f"unknown dtype {requested!r} (use auto, float32, bfloat16 or float16)")
    if name == "float16" and device.type == "cpu":
        raise InvalidRequestError("float16 is not supported on CPU (use bfloat16 or float32)")
    return _DTYPES[name]
