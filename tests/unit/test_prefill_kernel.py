"""The C++ prefill-attention kernel against fp32 attention in torch, and the engine with it against without it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.models import attention
from engine.sampling_params import SamplingParams
from engine.tiny_model import make_tiny_model

BLOCK_SIZE = 16


def _kernel_available(head_dim: int) -> bool:
    probe_q = torch.zeros(1, 1, head_dim, dtype=torch.bfloat16)
    probe_kv = torch.zeros(1, 2, BLOCK_SIZE, 1, head_dim, dtype=torch.bfloat16)
    return kernels.prefill_attention_supported(probe_q, probe_kv)


needs_kernel = pytest.mark.skipif(
    not _kernel_available(64), reason="the C++ prefill kernel needs an AVX-512 BF16 CPU and a compiler"
)


class PrefillCase:
    """A shuffled paged cache holding several sequences, and one step's query rows for a chunk of each."""

    def __init__(
        self, chunks: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, decode_rows: int = 3
    ):
        gen = torch.Generator().manual_seed(len(chunks) * 1000 + heads * 10 + head_dim)
        counts = [math.ceil(ctx / BLOCK_SIZE) for _, ctx in chunks]
        num_blocks = sum(counts) + 4
        owners = torch.randperm(num_blocks, generator=gen).tolist()
        width = max(counts) + 1  # unused columns must not be read
        self.tables = torch.randint(0, num_blocks, (len(chunks), width), generator=gen, dtype=torch.int32)
        rows, first = [], decode_rows  # rows before the chunks stand for the step's decode tokens
        for c, ((n, ctx), count) in enumerate(zip(chunks, counts, strict=True)):
            self.tables[c, :count] = torch.tensor([owners.pop() for _ in range(count)], dtype=torch.int32)
            rows.append([first, n, ctx])
            first += n
        self.chunks = torch.tensor(rows, dtype=torch.int32)
        self.kv = torch.randn(num_blocks, 2, BLOCK_SIZE, kv_heads, head_dim, generator=gen).bfloat16()
        self.query = torch.randn(first, heads, head_dim, generator=gen).bfloat16()

    def run(self, scale: float, window: int | None) -> torch.Tensor:
        out = torch.zeros_like(self.query)
        kernels.paged_prefill_attention(self.query, out, self.kv, self.tables, self.chunks, scale, window)
        return out

    def reference(self, scale: float, window: int | None) -> torch.Tensor:
        """fp32 attention per chunk with an explicit causal (and window) mask; rows outside chunks stay zero."""
        out = torch.zeros(self.query.shape)
        for (first, n, ctx), table in zip(self.chunks.tolist(), self.tables, strict=True):
            blocks = self.kv.index_select(0, table[: math.ceil(ctx / BLOCK_SIZE)].long()).float()
            keys = blocks[:, 0].flatten(0, 1)[:ctx].transpose(0, 1)
            values = blocks[:, 1].flatten(0, 1)[:ctx].transpose(0, 1)
            q_pos = torch.arange(ctx - n, ctx)[:, None]
            k_pos = torch.arange(ctx)[None]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            q = self.query[first : first + n].float().transpose(0, 1)
            result = F.scaled_dot_product_attention(
                q[None], keys[None], values[None], attn_mask=allowed, scale=scale, enable_gqa=True
            )
            out[first : first + n] = result[0].transpose(0, 1)
        return out


@needs_kernel
@pytest.mark.parametrize(
    ("chunks", "heads", "kv_heads", "head_dim", "window"),
    [
        ([(5, 5)], 4, 2, 64, None),  # shorter than one key tile
        ([(37, 37), (20, 100), (2, 9)], 16, 4, 64, None),  # fresh prompts and chunks after a cached prefix
        ([(300, 300)], 8, 8, 64, None),  # no GQA; several 64-key spans and tasks
        ([(33, 70)], 28, 4, 64, None),  # a group of 7: tiles of 16 query vectors split rows
        ([(50, 200), (64, 64)], 8, 2, 64, 32),  # sliding window: spans below it are skipped
        ([(40, 40)], 8, 2, 128, None),
        ([(70, 90)], 4, 2, 16, None),
        ([(70, 90)], 4, 1, 96, 24),
        ([(30, 30)], 2, 2, 256, None),
        ([(1, 1), (1, 17)], 4, 2, 64, None),  # single-row chunks
    ],
)
def test_kernel_matches_fp32_attention(
    chunks: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, window: int | None
) -> None:
    case = PrefillCase(chunks, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    out = case.run(scale, window)
    expected = case.reference(scale, window)
    # bf16 inputs, probabilities rounded to bf16 for P.V (as flash attention does), bf16 output: ~1% of the values.
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    decode_rows = int(case.chunks[0, 0])
    assert not out[:decode_rows].any(), "rows outside the chunks were written"


@needs_kernel
def test_kernel_rejects_indices_outside_the_cache() -> None:
    case = PrefillCase([(20, 40)], 4, 2, 64)
    case.tables[0, 0] = case.kv.shape[0]
    with pytest.raises(IndexError):
        case.run(0.125, None)
    case = PrefillCase([(20, 40)], 4, 2, 64)
    case.chunks[0, 0] = case.query.shape[0]  # rows past the batch
    with pytest.raises(IndexError):
        case.run(0.125, None)
    case = PrefillCase([(20, 40)], 4, 2, 64)
    with pytest.raises(ValueError, match="more blocks"):
        kernels.paged_prefill_attention(
            case.query, torch.zeros_like(case.query), case.kv, case.tables[:, :1], case.chunks, 0.125
        )


@needs_kernel
def test_engine_outputs_agree_with_and_without_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens of a bf16 model with 64-wide heads (the kernel's main case), chunked prefill with cached prefixes."""
    model = make_tiny_model(tmp_path / "m", arch="llama", layers=2, hidden=256, heads=4, kv_heads=2, seed=3)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (7, 90, 150, 260)]
    prompts.append(prompts[3][:200] + prompts[0])  # shares a cached prefix with the previous prompt
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def generate() -> list[list[int]]:
        engine = LLMEngine(model, EngineConfig(dtype="bfloat16", max_num_batched_tokens=128, max_num_seqs=8))
        return [c.token_ids for c in engine.generate(prompts, params)]

    calls = []
    real = kernels.paged_prefill_attention
    monkeypatch.setattr(kernels, "paged_prefill_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_kernel = generate()
    assert calls, "the kernel was not used"
    monkeypatch.setattr(attention.kernels, "prefill_attention_supported", lambda q, kv: False)
    without = generate()
    # bf16 near-ties may flip a token between two valid op orders; on random weights they are rare.
    agreeing = sum(a == b for a, b in zip(with_kernel, without, strict=True))
    assert agreeing >= len(prompts) - 1, (with_kernel, without)
