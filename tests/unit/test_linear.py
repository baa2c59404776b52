"""engine/models/linear.py: packed bf16 weights give exactly F.linear's outputs; float32 and opt-out stay plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.linear import PACK_ENV, Linear, packing_applies


def test_packed_bf16_linear_is_bit_identical_to_f_linear() -> None:
    if not packing_applies(torch.zeros(1, 1, dtype=torch.bfloat16)):
        pytest.skip("this CPU or torch build has no oneDNN bf16 matmul: packing does not apply")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    for with_bias in (None, bias):
        layer = Linear(weight, with_bias)
        assert layer.packed and layer.weight is None  # the packed copy replaced the plain one
        for rows in (0, 1, 7, 300):
            x = torch.randn(rows, 64, generator=gen).bfloat16()
            assert torch.equal(layer(x), F.linear(x, weight, with_bias))
        strided = torch.randn(5, 128, generator=gen).bfloat16()[:, :64]
        assert torch.equal(layer(strided), F.linear(strided, weight, with_bias))


def test_float32_and_opt_out_keep_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(8, 4)
    assert not Linear(weight).packed  # float32: MKL's sgemm, as the reference runs it
    monkeypatch.setenv(PACK_ENV, "0")
    layer = Linear(weight.bfloat16())
    assert not layer.packed
    x = torch.randn(3, 4).bfloat16()
    assert torch.equal(layer(x), F.linear(x, weight.bfloat16()))


def test_nbytes_counts_what_a_product_reads() -> None:
    weight, bias = torch.randn(8, 4), torch.randn(8)
    assert Linear(weight, bias).nbytes == (8 * 4 + 8) * 4
