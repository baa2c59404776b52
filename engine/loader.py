"""Reads a checkpoint's tensors from local safetensors files (single or sharded), checking every file before use.

A truncated or corrupt file must fail with its name and the problem, not with a crash deep inside a forward pass, so the
header and the file size are checked against each other before any tensor is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEADER_LIMIT = 100 * 1024**2  # safetensors itself refuses headers above 100 MB


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, or the single file, or every *.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
        return [model_dir / n for n in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are supported)"
        )
    return files


def check_safetensors_file(path: Path) -> None:
    """Raise ModelLoadError unless the file's header parses and its size matches what the header promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _HEADER_LIMIT:
            raise ModelLoadError(f"{path}: corrupt safetensors header (claims {header_len} bytes)")
        if 8 + header_len > size:
            raise ModelLoadError(
                f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header entry {name!r}") from exc
    expected = 8 + header_len + data_end
    if size < expected:
        raise ModelLoadError(f"{path}: truncated safetensors file (expected {expected} bytes, found {size})")


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, after checking each file."""
    files = checkpoint_files(model_dir)
    for path in files:
        check_safetensors_file(path)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read tensors ({exc})") from exc
