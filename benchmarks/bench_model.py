"""The tiny random models the benchmarks run on, made once under .cache and remade when their recipe changes.

A benchmark's --model may also point at a user's own checkpoint: that directory is only ever filled when it has no
model yet, never remade.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
# engine_throughput.py's and structured_output.py's ~156M-parameter Llama (vocab 32,000).
LLAMA_156M: dict[str, Any] = dict(
    arch="llama", layers=8, hidden=1024, heads=16, kv_heads=4, vocab=32000, intermediate=2816
)
# A ~1.1B Llama (Llama 3.2 1B's layout with a 32,000 vocab) for the GPU machine (benchmarks/gpu_suite.sh).
LLAMA_1B: dict[str, Any] = dict(
    arch="llama", layers=16, hidden=2048, heads=32, kv_heads=8, vocab=32000, intermediate=8192
)
# --shape choices of the engine benchmarks
SHAPES: dict[str, dict[str, Any]] = {"156m": LLAMA_156M, "1b": LLAMA_1B}
# The cluster benchmarks' 8-layer Llama with a 4k context.
LLAMA_8L_4K: dict[str, Any] = dict(
    arch="llama", layers=8, hidden=512, heads=8, kv_heads=2, vocab=8000, max_position_embeddings=4096
)


def ensure_model(path: Path, **recipe: Any) -> Path:
    """A model at `path` made by make_tiny_model(**recipe): ours (under .cache) is remade when the recipe differs."""
    sys.path.insert(0, str(REPO))
    from engine.tiny_model import make_tiny_model

    ours = path.resolve().is_relative_to(CACHE)
    if ours or not (path / "config.json").exists():
        make_tiny_model(path, reuse=ours, **recipe)
    return path
