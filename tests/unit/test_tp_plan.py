"""Which part of each weight a tensor-parallel rank holds (engine/tensor_parallel/plan.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.tensor_parallel import TPPlan

BASE = ModelConfig(
    model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=8,
    num_kv_heads=2, head_dim=1, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling=None, tie_word_embeddings=False, attention_bias=False, qk_norm=False, sliding_window=None,
    hidden_act="silu", torch_dtype=None, bos_token_id=None, eos_token_ids=(),
)  # fmt: skip


def plans(world: int, **changes: object) -> list[TPPlan]:
    config = dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]
    return [TPPlan(config, rank, world) for rank in range(world)]


def test_heads_columns_and_vocabulary_split_evenly_and_cover_everything() -> None:
    ranks = plans(2)
    assert [list(p.q_heads) for p in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(p.kv_heads) for p in ranks] == [[0], [1]]
    assert [list(p.intermediate) for p in ranks] == [list(range(6)), list(range(6, 12))]
    assert [list(p.vocab) for p in ranks] == [list(range(5)), list(range(5, 10))]
    local = ranks[1].local_config
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 1, 6)


def test_kv_heads_are_replicated_when_ranks_outnumber_them() -> None:
    # 8 query heads over 4 ranks, 2 KV heads: ranks 0-1 read KV head 0, ranks 2-3 KV head 1.
    assert [list(p.kv_heads) for p in plans(4)] == [[0], [0], [1], [1]]
    assert [list(p.kv_heads) for p in plans(2, num_kv_heads=1)] == [[0], [0]]
    for p in plans(4):  # every query head of a rank reads the KV head the rank holds
        assert {h // BASE.group_size for h in p.q_heads} == set(p.kv_heads)


def test_the_last_vocabulary_slice_is_padded_to_equal_parts() -> None:
    weight = torch.arange(10.0).unsqueeze(1).repeat(1, 8)
    last = plans(4)[3]  # ceil(10 / 4) = 3 rows per rank: rank 3 holds row 9 and two zero rows
    assert list(last.vocab) == [9]
    rows = last.vocab_rows(weight)
    assert rows.shape == (3, 8) and rows[0, 0] == 9 and not rows[1:].any()


def test_slices_of_each_projection_match_the_heads() -> None:
    p = plans(2)[1]
    q, k, v = torch.arange(8.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    assert p.qkv_rows(q, k, v).tolist() == [4, 5, 6, 7, 11, 21]
    o = torch.arange(64.0).view(8, 8)
    assert p.o_proj_columns(o).tolist() == o[:, 4:].tolist()
    gate, up = torch.arange(12.0), torch.arange(100.0, 112.0)
    assert p.gate_up_rows(gate, up).tolist() == [6, 7, 8, 9, 10, 11, 106, 107, 108, 109, 110, 111]


@pytest.mark.parametrize(
    ("world", "changes", "named"),
    [
        (3, {}, "8 attention heads"),
        (4, {"num_kv_heads": 8, "num_heads": 8, "intermediate_size": 10}, "intermediate size 10"),
        (4, {"num_kv_heads": 3, "num_heads": 12}, "3 KV heads"),
    ],
)
def test_a_split_that_does_not_divide_the_model_is_refused_naming_what(
    world: int, changes: dict[str, int], named: str
) -> None:
    with pytest.raises(ModelLoadError, match=named):
        plans(world, **changes)
