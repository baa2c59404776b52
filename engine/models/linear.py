"""The decoder's linear layers, with oneDNN's prepacked weights for bfloat16 on CPUs.

`F.linear` in bf16 on a CPU runs a oneDNN matmul that first reorders the weight into oneDNN's blocked layout, on every
call. For a prefill chunk that is small beside the matmul; for a decode step (a few rows against every weight of the
model) it triples the memory traffic that bounds the step: measured here, a 156M Llama's decode steps at 12 sequences
spent 25 ms in linears plainly and 18 ms prepacked. So on CPUs with bf16 support each weight is reordered once, at load
(`torch.ops.mkldnn._reorder_linear_weight`, the op torch's own compiler uses for frozen CPU models), and multiplied
with `torch.ops.mkldnn._linear_pointwise`. The arithmetic is oneDNN's either way: outputs are bit-identical to
`F.linear` (tests/unit/test_linear.py). float32 keeps `F.linear` (MKL's sgemm, as Hugging Face's reference runs it), as
do GPUs and builds without those ops; SPLITSERVE_PACKED_LINEAR=0 turns packing off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PACK_ENV = "SPLITSERVE_PACKED_LINEAR"
_ROWS_HINT = 64  # the batch the packing is tuned for (any number of rows works): a typical decode batch


class Linear:
    """y = x @ weight.T + bias, with the weight packed for oneDNN where that helps (see the module doc)."""

    __slots__ = ("_packed", "bias", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self._packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = weight
        if packing_applies(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
            self.weight = (
                None  # the packed copy replaces it (the caller may still hold it, e.g. tied embeddings)
            )

    @property
    def packed(self) -> bool:
        return self._packed is not None

    @property
    def nbytes(self) -> int:
        """Bytes a product reads from memory: the weight (packed or not) and the bias."""
        tensors = (self._packed if self._packed is not None else self.weight, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)


def packing_applies(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and os.environ.get(PACK_ENV, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
