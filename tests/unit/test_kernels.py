"""engine.kernels: the CPU path and the Triton kernels against the plain reference implementations.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. TRITON_INTERPRET must be set
before the module defining the @triton.jit functions is imported, hence the environment tweak above the
imports.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from engine import kernels
from engine.kernels import cpu, cpu_native, triton_kernels
from engine.kernels.reference import (
    gather_blocks_reference,
    paged_decode_attention_reference,
    scatter_blocks_reference,
    store_kv_reference,
)

# The interpreter runs kernels on CPU tensors; a real GPU needs CUDA ones.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
BLOCK_SIZE = 16
HEAD_LAYOUTS = [(4, 4), (8, 4), (8, 2), (8, 1)]  # (query heads, KV heads): GQA ratios 1, 2, 4 and 8
# Lengths 1, exact multiples of the block size, one past a multiple, a long one, and a padding row (0).
SEQ_LENS = [1, 16, 17, 32, 150, 0, 45]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16 outputs may differ by one rounding step of the final cast; fp32 ones only by summation order.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), atol=tolerance, rtol=tolerance)


# --------------------------------------------------------------------------------------------------- fixtures


@dataclass
class DecodeCase:
    query: torch.Tensor
    kv_layer: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query, self.kv_layer, self.block_tables, self.seq_lens


def make_decode_case(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> DecodeCase:
    """Random cache whose sequences own shuffled blocks; unused table entries name other (valid) blocks."""
    gen = torch.Generator().manual_seed(seed)
    counts = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(counts) + 3  # a few blocks owned by nobody
    width = max(counts) + 1  # at least one unused column per row
    owners = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    used = 0
    for row, count in enumerate(counts):
        tables[row, :count] = owners[used : used + count]
        used += count
    kv_layer = torch.randn(num_blocks, 2, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return DecodeCase(query.to(device), kv_layer.to(device), tables.to(device), lens.to(device))


def make_store_inputs(
    num_tokens: int, num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key/value as strided slices of a fused qkv tensor; distinct random slots, some of them padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[::5] = -1
    kv_layer = torch.randn(num_blocks, 2, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    return key, value, kv_layer, slots


def strided_kv_layer(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """One layer of a [num_blocks, layers, ...] allocation: each block is contiguous, the layer is not."""
    whole = torch.randn(num_blocks, 3, 2, BLOCK_SIZE, num_kv_heads, head_dim).to(dtype)
    return whole[:, 1]


# --------------------------------------------------------------------------------------------------- CPU path


# The C++ kernel (where built: kernels.paged_decode_attention takes it) and the torch ops it falls back to.
DECODE_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "dispatched": kernels.paged_decode_attention,
    "torch-ops": cpu.torch_paged_decode_attention,
}


def test_the_cpu_kernels_are_built_where_a_compiler_is() -> None:
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the torch ops serve")
    assert cpu_native.native() is not None, cpu_native._failed


@pytest.mark.parametrize("implementation", DECODE_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("sliding_window", [None, 1, 16, 20, 1000])
@pytest.mark.parametrize(
    "head_dim", [32, 64]
)  # 64 in bf16 takes the C++ kernel's AVX-512 path where it has one
def test_cpu_decode_attention_matches_reference(
    implementation: str,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    sliding_window: int | None,
    head_dim: int,
) -> None:
    case = make_decode_case(SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype)
    expected = paged_decode_attention_reference(*case.args(), 0.17, sliding_window)
    actual = DECODE_IMPLEMENTATIONS[implementation](*case.args(), 0.17, sliding_window)
    _assert_close(actual, expected, dtype)
    assert not actual[SEQ_LENS.index(0)].any()  # padding row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_attention_reads_a_strided_layer(dtype: torch.dtype) -> None:
    case = make_decode_case([5, 40, 16, 0], 8, 2, 64, dtype, seed=3)
    whole = torch.zeros(case.kv_layer.shape[0], 3, *case.kv_layer.shape[1:], dtype=dtype)
    whole[:, 1] = case.kv_layer
    strided = whole[:, 1]  # one layer of a block-major allocation, as KV transfer registers it
    expected = paged_decode_attention_reference(*case.args(), 0.3, 7)
    actual = kernels.paged_decode_attention(case.query, strided, case.block_tables, case.seq_lens, 0.3, 7)
    _assert_close(actual, expected, dtype)


def test_cpu_decode_attention_refuses_blocks_outside_the_cache() -> None:
    case = make_decode_case([5, 40], 4, 2, 8, torch.float32)
    tables = case.block_tables.clone()
    tables[1, 0] = case.kv_layer.shape[0]
    with pytest.raises(IndexError):
        kernels.paged_decode_attention(case.query, case.kv_layer, tables, case.seq_lens, 1.0)
    with pytest.raises(ValueError, match="blocks"):  # a sequence longer than its table
        kernels.paged_decode_attention(
            case.query, case.kv_layer, case.block_tables[:, :1], case.seq_lens, 1.0
        )
    # The checks run once per step for the tensors every layer shares; an in-place edit of them is seen again.
    tables = case.block_tables.clone()
    kernels.paged_decode_attention(case.query, case.kv_layer, tables, case.seq_lens, 1.0)
    tables[0, 0] = -1
    with pytest.raises(IndexError):
        kernels.paged_decode_attention(case.query, case.kv_layer, tables, case.seq_lens, 1.0)
    with torch.inference_mode():  # inference tensors keep no version: checked on every call
        tables = case.block_tables.clone()
        kernels.paged_decode_attention(case.query, case.kv_layer, tables, case.seq_lens, 1.0)
        tables[0, 0] = case.kv_layer.shape[0]
        with pytest.raises(IndexError):
            kernels.paged_decode_attention(case.query, case.kv_layer, tables, case.seq_lens, 1.0)


# Budgets giving one sequence per chunk, mixed chunks, and the whole batch in one chunk.
@pytest.mark.parametrize("budget", [0, 1 << 12, 1 << 40])
def test_cpu_decode_attention_chunking(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(cpu, "CHUNK_ELEMENT_BUDGET", budget)
    lens = [3, 200, 16, 64, 1, 90, 0, 33, 48, 17]
    case = make_decode_case(lens, 8, 2, 16, torch.float32, seed=1)
    for window in (None, 40):
        expected = paged_decode_attention_reference(*case.args(), 0.25, window)
        actual = cpu.torch_paged_decode_attention(*case.args(), 0.25, window)
        _assert_close(actual, expected, torch.float32)


def test_cpu_decode_attention_accepts_int64_indices_and_strided_query() -> None:
    case = make_decode_case([5, 40, 16], 8, 2, 32, torch.float32)
    fused = torch.randn(3, 12, 32)  # q heads 0..7 of a fused projection: a non-contiguous view
    fused[:, :8] = case.query
    query = fused[:, :8]
    expected = paged_decode_attention_reference(*case.args(), 0.2)
    actual = kernels.paged_decode_attention(
        query, case.kv_layer, case.block_tables.long(), case.seq_lens.long(), 0.2
    )
    _assert_close(actual, expected, torch.float32)
    assert actual.is_contiguous()


def test_cpu_decode_attention_empty_batch() -> None:
    case = make_decode_case([4], 4, 2, 8, torch.float32)
    out = kernels.paged_decode_attention(
        case.query[:0], case.kv_layer, case.block_tables[:0], case.seq_lens[:0], 1.0
    )
    assert out.shape == (0, 4, 8)


def _case_with_garbage_outside_ranges(
    seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, window: int | None
) -> DecodeCase:
    """A bf16 case whose cache slots outside each row's attended range (before its window, past its end) hold
    garbage: K rows of 1000 (scores that would swamp the real ones), V rows of NaN."""
    gen = torch.Generator().manual_seed(len(seq_lens) + num_heads + head_dim + block_size)
    counts = [math.ceil(n / block_size) for n in seq_lens]
    owners = torch.randperm(sum(counts) + 2, generator=gen)
    kv_layer = torch.randn(len(owners), 2, block_size, num_kv_heads, head_dim, generator=gen).to(
        torch.bfloat16
    )
    tables = torch.zeros(len(seq_lens), max(counts) + 1, dtype=torch.int32)
    used = 0
    for row, (length, count) in enumerate(zip(seq_lens, counts, strict=True)):
        tables[row, :count] = owners[used : used + count]
        used += count
        start = max(0, length - window) if window else 0
        for i in range(count):
            block = kv_layer[int(tables[row, i])]
            for outside in (
                slice(0, max(0, start - i * block_size)),
                slice(max(0, length - i * block_size), None),
            ):
                block[0, outside] = 1000.0
                block[1, outside] = float("nan")
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(torch.bfloat16)
    return DecodeCase(query, kv_layer, tables, torch.tensor(seq_lens, dtype=torch.int32))


# bf16 with head_dim 64 or 128 takes the C++ kernel's AVX-512 path where it has one: groups of 1 to 16 query heads
# per KV head (6 is padded to 8; 32 takes the generic path), 16- and 32-token blocks, rows cut between threads.
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(16, 1, 64), (8, 4, 64), (12, 2, 64), (32, 1, 64), (16, 4, 128), (32, 2, 128), (8, 8, 128)],
)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("sliding_window", [None, 37])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_decode_attention_bf16_shapes_and_threads(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    sliding_window: int | None,
    threads: int,
) -> None:
    lens = [1, 16, 17, 700, 0, 45, 300, 33]
    case = _case_with_garbage_outside_ranges(
        lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window
    )
    no_nan = case.kv_layer.nan_to_num(0.0)  # the reference's masked matmuls would spread NaN (0 * NaN)
    expected = paged_decode_attention_reference(
        case.query, no_nan, case.block_tables, case.seq_lens, 0.125, sliding_window
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel splits the batch's blocks into one slice per thread
    try:
        actual = kernels.paged_decode_attention(*case.args(), 0.125, sliding_window)
    finally:
        torch.set_num_threads(previous)
    assert torch.isfinite(actual.float()).all()  # no NaN from slots outside the attended ranges
    _assert_close(actual, expected, torch.bfloat16)
    assert not actual[lens.index(0)].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_store_kv_matches_reference(dtype: torch.dtype) -> None:
    key, value, kv_layer, slots = make_store_inputs(37, 6, 2, 16, dtype)
    expected = kv_layer.clone()
    store_kv_reference(key, value, expected, slots)
    kernels.store_kv(key, value, kv_layer, slots.to(torch.int32))
    assert torch.equal(kv_layer, expected)


def test_cpu_store_kv_into_strided_layer_without_padding() -> None:
    key, value, _, slots = make_store_inputs(20, 4, 2, 8, torch.float32)
    slots = slots.abs()  # no padding entries: the fast path without filtering
    kv_layer = strided_kv_layer(4, 2, 8, torch.float32)
    expected = kv_layer.clone()
    store_kv_reference(key, value, expected, slots)
    kernels.store_kv(key, value, kv_layer, slots)
    assert torch.equal(kv_layer, expected)


@pytest.mark.parametrize("native", ["1", "0"])
def test_cpu_store_kv_rejects_slots_past_the_cache_before_writing(
    native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C++ copy (and the torch fallback) raise IndexError for a slot past the cache, and write nothing."""
    if native == "0":
        monkeypatch.setattr(cpu_native, "native", lambda: None)
    key, value, kv_layer, slots = make_store_inputs(12, 4, 2, 16, torch.bfloat16)
    slots = slots.abs()
    slots[-1] = kv_layer.shape[0] * kv_layer.shape[2]  # one past the last slot
    before = kv_layer.clone()
    with pytest.raises(IndexError):
        kernels.store_kv(key, value, kv_layer, slots)
    if native == "1":
        assert torch.equal(kv_layer, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_gather_scatter_match_reference(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    kv_layer = torch.randn(9, 2, BLOCK_SIZE, 2, 8).to(dtype)
    ids = torch.tensor([7, 2, 5, 0], dtype=index_dtype)
    gathered = kernels.gather_blocks(kv_layer, ids)
    assert gathered.is_contiguous()
    assert torch.equal(gathered, gather_blocks_reference(kv_layer, ids))

    out = torch.empty_like(gathered)
    assert kernels.gather_blocks(kv_layer, ids, out) is out
    assert torch.equal(out, gathered)

    buffer = torch.randn_like(gathered, dtype=torch.float32).to(dtype)
    expected = kv_layer.clone()
    scatter_blocks_reference(buffer, expected, ids)
    kernels.scatter_blocks(buffer, kv_layer, ids)
    assert torch.equal(kv_layer, expected)


def test_cpu_gather_then_scatter_round_trips() -> None:
    source = torch.randn(6, 2, BLOCK_SIZE, 1, 4)
    target = torch.zeros_like(source)
    ids = torch.tensor([4, 1, 3])
    kernels.scatter_blocks(kernels.gather_blocks(source, ids), target, ids)
    assert torch.equal(target[ids], source[ids])
    assert not target[[0, 2, 5]].any()


# --------------------------------------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_triton_decode_attention_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, sliding_window: int | None
) -> None:
    lens = [1, 16, 17, 100, 0]  # 100 tokens span two 64-token tiles
    case = make_decode_case(lens, num_heads, num_kv_heads, 32, dtype, device=TRITON_DEVICE)
    expected = paged_decode_attention_reference(*case.args(), 0.17, sliding_window)
    actual = triton_kernels.paged_decode_attention(*case.args(), 0.17, sliding_window)
    _assert_close(actual, expected, dtype)
    assert not actual[lens.index(0)].any()  # padding row


def test_triton_decode_attention_odd_head_dim_and_strided_inputs() -> None:
    # head_dim 24 is padded to 32 in the kernel; query, cache and seq_lens are strided views; int64 indices.
    case = make_decode_case([9, 70, 32], 6, 2, 24, torch.float32, device=TRITON_DEVICE)
    fused = torch.randn(3, 10, 24, device=TRITON_DEVICE)
    fused[:, 2:8] = case.query
    whole = torch.randn(case.kv_layer.shape[0], 2, *case.kv_layer.shape[1:], device=TRITON_DEVICE)
    whole[:, 1] = case.kv_layer
    query, kv_layer = fused[:, 2:8], whole[:, 1]
    expected = paged_decode_attention_reference(*case.args(), 0.3, 50)
    seq_lens = torch.stack([case.seq_lens, case.seq_lens], dim=1).long()[:, 0]
    actual = triton_kernels.paged_decode_attention(
        query, kv_layer, case.block_tables.long(), seq_lens, 0.3, 50
    )
    _assert_close(actual, expected, torch.float32)
    assert actual.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_store_kv_matches_reference(dtype: torch.dtype) -> None:
    key, value, kv_layer, slots = make_store_inputs(37, 6, 2, 16, dtype)
    expected = kv_layer.clone()
    store_kv_reference(key, value, expected, slots)
    kv_layer = kv_layer.to(TRITON_DEVICE)
    triton_kernels.store_kv(
        key.to(TRITON_DEVICE), value.to(TRITON_DEVICE), kv_layer, slots.to(TRITON_DEVICE, torch.int32)
    )
    assert torch.equal(kv_layer.cpu(), expected)


def test_triton_store_kv_many_tiles_odd_head_dim() -> None:
    # KVH*D = 3*40 = 120 is padded to 128 per token, 300 tokens need several programs, slots are strided.
    key, value, kv_layer, slots = make_store_inputs(300, 40, 3, 40, torch.float32, seed=3)
    expected = kv_layer.clone()
    store_kv_reference(key, value, expected, slots)
    kv_layer = kv_layer.to(TRITON_DEVICE)
    strided_slots = torch.stack([slots, slots], dim=1).to(TRITON_DEVICE)[:, 1]
    triton_kernels.store_kv(key.to(TRITON_DEVICE), value.to(TRITON_DEVICE), kv_layer, strided_slots)
    assert torch.equal(kv_layer.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gather_scatter_match_reference(dtype: torch.dtype) -> None:
    kv_layer = strided_kv_layer(9, 2, 8, dtype).to(TRITON_DEVICE)
    ids = torch.tensor([7, 2, 5, 0], dtype=torch.int32, device=TRITON_DEVICE)
    gathered = triton_kernels.gather_blocks(kv_layer, ids)
    assert torch.equal(gathered.cpu(), gather_blocks_reference(kv_layer.cpu(), ids.cpu()))

    out = torch.empty_like(gathered)
    assert triton_kernels.gather_blocks(kv_layer, ids.long(), out) is out
    assert torch.equal(out, gathered)

    buffer = torch.randn(gathered.shape).to(dtype)
    expected = kv_layer.cpu().clone()
    scatter_blocks_reference(buffer, expected, ids.cpu())
    triton_kernels.scatter_blocks(buffer.to(TRITON_DEVICE), kv_layer, ids)
    assert torch.equal(kv_layer.cpu(), expected)


def test_triton_gather_copies_large_blocks_in_tiles() -> None:
    # 2*16*4*64 = 8192 elements per block: two 4096-element tiles.
    kv_layer = torch.randn(5, 2, BLOCK_SIZE, 4, 64, device=TRITON_DEVICE)
    ids = torch.tensor([[4, 9], [0, 9]], device=TRITON_DEVICE)[:, 0]  # a strided view
    assert torch.equal(triton_kernels.gather_blocks(kv_layer, ids), kv_layer[ids])


def test_triton_empty_inputs_launch_nothing() -> None:
    kv_layer = torch.randn(3, 2, BLOCK_SIZE, 1, 8, device=TRITON_DEVICE)
    before = kv_layer.clone()
    empty_ids = torch.empty(0, dtype=torch.int64, device=TRITON_DEVICE)
    assert triton_kernels.gather_blocks(kv_layer, empty_ids).shape == (0, 2, BLOCK_SIZE, 1, 8)
    triton_kernels.scatter_blocks(kv_layer[:0], kv_layer, empty_ids)
    empty_kv = torch.empty(0, 1, 8, device=TRITON_DEVICE)
    triton_kernels.store_kv(empty_kv, empty_kv, kv_layer, empty_ids)
    assert torch.equal(kv_layer, before)


def test_triton_copy_rejects_non_contiguous_blocks() -> None:
    kv_layer = torch.randn(4, 2, BLOCK_SIZE, 2, 16, device=TRITON_DEVICE)[..., ::2]
    ids = torch.tensor([1], device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        triton_kernels.gather_blocks(kv_layer, ids)
    with pytest.raises(ValueError, match="contiguous"):
        triton_kernels.scatter_blocks(
            torch.zeros(1, *kv_layer.shape[1:], device=TRITON_DEVICE), kv_layer, ids
        )


def test_dispatcher_routes_cuda_tensors_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend kv_layer is on a GPU: the public functions must then call the Triton wrappers, which the
    # interpreter (or a real GPU) runs; the results must still match the reference.
    monkeypatch.setattr(kernels, "_on_cuda", lambda kv_layer: True)
    calls: list[str] = []
    for name in ("store_kv", "paged_decode_attention", "gather_blocks", "scatter_blocks"):
        original = getattr(triton_kernels, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, spy)

    case = make_decode_case([3, 20], 4, 2, 16, torch.float32, device=TRITON_DEVICE)
    expected = paged_decode_attention_reference(*case.args(), 0.5)
    _assert_close(kernels.paged_decode_attention(*case.args(), 0.5), expected, torch.float32)
    ids = torch.tensor([1, 0], device=TRITON_DEVICE)
    gathered = kernels.gather_blocks(case.kv_layer, ids)
    kernels.scatter_blocks(gathered, case.kv_layer, ids.flip(0))
    key = torch.randn(2, 2, 16, device=TRITON_DEVICE)
    kernels.store_kv(key, key, case.kv_layer, torch.tensor([0, -1], device=TRITON_DEVICE))
    assert calls == ["paged_decode_attention", "gather_blocks", "scatter_blocks", "store_kv"]


# ------------------------------------------------------------------------------------------------- validation


def _valid_decode_args() -> dict[str, object]:
    case = make_decode_case([5, 20], 4, 2, 8, torch.float32)
    return {
        "query": case.query,
        "kv_layer": case.kv_layer,
        "block_tables": case.block_tables,
        "seq_lens": case.seq_lens,
        "scale": 0.5,
        "sliding_window": None,
    }


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("query", torch.randn(2, 3, 8), "not a multiple"),
        ("query", torch.randn(2, 4, 16), "query must have shape"),
        ("query", torch.randn(2, 4, 8, dtype=torch.bfloat16), "query dtype"),
        ("kv_layer", torch.randn(4, 2, 16, 2), "kv_layer must have shape"),
        ("kv_layer", torch.randn(4, 2, 12, 2, 8), "power of two"),
        ("kv_layer", torch.randn(4, 2, 16, 2, 8).to(torch.float64), "kv_layer dtype"),
        ("block_tables", torch.zeros(3, 4, dtype=torch.int32), "batch sizes differ"),
        ("block_tables", torch.zeros(2, 4), "block_tables must be int32 or int64"),
        ("seq_lens", torch.tensor([5]), "batch sizes differ"),
        ("seq_lens", torch.tensor([[5, 20]]), "seq_lens must be 1-D"),
        ("seq_lens", torch.zeros(2, dtype=torch.int32, device="meta"), "seq_lens is on meta"),
        ("scale", float("nan"), "scale"),
        ("sliding_window", 0, "sliding_window"),
    ],
)
@pytest.mark.parametrize("backend", ["dispatch", "triton"])
def test_decode_attention_rejects_bad_arguments(field: str, bad: object, message: str, backend: str) -> None:
    args = _valid_decode_args()
    args[field] = bad
    fn = kernels.paged_decode_attention if backend == "dispatch" else triton_kernels.paged_decode_attention
    with pytest.raises(ValueError, match=message):
        fn(**args)  # type: ignore[arg-type]


def test_decode_attention_rejects_lengths_beyond_block_table() -> None:
    case = make_decode_case([5, 20], 4, 2, 8, torch.float32)
    too_long = torch.tensor([5, 20 + 3 * BLOCK_SIZE], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables has only"):
        kernels.paged_decode_attention(case.query, case.kv_layer, case.block_tables, too_long, 0.5)


@pytest.mark.parametrize("store", [kernels.store_kv, triton_kernels.store_kv])
def test_store_kv_rejects_bad_arguments(store: Callable[..., None]) -> None:
    key, value, kv_layer, slots = make_store_inputs(6, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="value dtype"):
        store(key, value.to(torch.bfloat16), kv_layer, slots)
    with pytest.raises(ValueError, match="key must have shape"):
        store(key[:, :1], value[:, :1], kv_layer, slots)
    with pytest.raises(ValueError, match="value shape"):
        store(key, value[:5], kv_layer, slots)
    with pytest.raises(ValueError, match="slot_mapping has 5 entries"):
        store(key, value, kv_layer, slots[:5])
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        store(key, value, kv_layer, slots.float())


@pytest.mark.parametrize("backend", [kernels, triton_kernels])
def test_gather_scatter_reject_bad_arguments(backend: Any) -> None:
    kv_layer = torch.randn(4, 2, BLOCK_SIZE, 2, 8)
    ids = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="out must have shape"):
        backend.gather_blocks(kv_layer, ids, torch.empty(3, 2, BLOCK_SIZE, 2, 8))
    with pytest.raises(ValueError, match="out must be contiguous"):
        out = torch.empty(2, 2, BLOCK_SIZE, 2, 16)[..., ::2]
        backend.gather_blocks(kv_layer, ids, out)
    with pytest.raises(ValueError, match="block_ids must be 1-D"):
        backend.gather_blocks(kv_layer, ids[None])
    with pytest.raises(ValueError, match="buffer dtype"):
        backend.scatter_blocks(torch.zeros(2, 2, BLOCK_SIZE, 2, 8).half(), kv_layer, ids)
    with pytest.raises(ValueError, match="buffer must have shape"):
        backend.scatter_blocks(torch.zeros(2, 2, BLOCK_SIZE, 2, 4), kv_layer, ids)


def test_importing_engine_kernels_does_not_import_triton() -> None:
    code = "import sys, engine.kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr or "engine.kernels imported triton at import time"
