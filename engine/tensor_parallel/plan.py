"""Which part of every weight one tensor-parallel rank holds (Megatron-style sharding of a decoder layer).

With N ranks, rank r holds:
- attention: query heads [r*H/N, (r+1)*H/N) (q/k/v projections column-parallel, o_proj row-parallel). KV heads
  split the same way when N divides them; when N exceeds them (N a multiple of KVH, e.g. a single KV head), each rank
  holds the one KV head its query heads read, so a KV head is replicated on N/KVH ranks;
- MLP: intermediate columns [r*I/N, (r+1)*I/N) of gate and up (column-parallel), the same rows of down (row-parallel);
- embedding and LM head: vocabulary rows [r*ceil(V/N), ...), zero-padded to equal slices so the logits of all ranks
  gather into one tensor of equal parts;
- norms: replicated.
Row-parallel outputs (o_proj, down) and the embedding are summed over ranks (all-reduce); logits are gathered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class TPPlan:
    config: ModelConfig  # the whole model's
    rank: int
    world: int

    def __post_init__(self) -> None:
        check_divisible(self.config, self.world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world})")

    # ---- head, column and vocabulary ranges -----------------------------------------------------------------------

    @property
    def q_heads(self) -> range:
        per = self.config.num_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        """The KV heads this rank holds: its share when they split evenly, else the one its query heads read."""
        cfg = self.config
        if cfg.num_kv_heads >= self.world:
            per = cfg.num_kv_heads // self.world
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.q_heads.start // cfg.group_size
        return range(head, head + 1)

    @property
    def intermediate(self) -> range:
        per = self.config.intermediate_size // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab(self) -> range:
        """The vocabulary rows this rank holds (the last rank's slice may be short: it is padded with zeros)."""
        start = self.rank * self.vocab_per_rank
        return range(
            min(start, self.config.vocab_size), min(start + self.vocab_per_rank, self.config.vocab_size)
        )

    @property
    def local_config(self) -> ModelConfig:
        """The shape this rank's model runs with: its heads, KV heads and intermediate columns."""
        return dataclasses.replace(
            self.config,
            num_heads=len(self.q_heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=len(self.intermediate),
        )

    # ---- slicing checkpoint tensors (whole-model shapes in, this rank's part out) -----------------------------------

    def qkv_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v projection's rows (weight or bias) of this rank's heads."""
        d = self.config.head_dim
        return torch.cat([_rows(q, self.q_heads, d), _rows(k, self.kv_heads, d), _rows(v, self.kv_heads, d)])

    def o_proj_columns(self, weight: torch.Tensor) -> torch.Tensor:
        d = self.config.head_dim
        return weight[:, self.q_heads.start * d : self.q_heads.stop * d]

    def gate_up_rows(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        part = slice(self.intermediate.start, self.intermediate.stop)
        return torch.cat([gate[part], up[part]])

    def down_columns(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[:, self.intermediate.start : self.intermediate.stop]

    def vocab_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Embedding or LM head rows of this rank's vocabulary slice, zero-padded to vocab_per_rank rows."""
        rows = weight[self.vocab.start : self.vocab.stop]
        missing = self.vocab_per_rank - rows.shape[0]
        if missing:
            rows = torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
        return rows


def check_divisible(config: ModelConfig, world: int) -> None:
    """ModelLoadError naming what does not divide, when the model cannot be split over `world` ranks."""
    if world < 1:
        raise ModelLoadError(f"tensor parallelism must be at least 1, got {world}")
    problems = []
    if config.num_heads % world:
        problems.append(f"{config.num_heads} attention heads")
    if config.num_kv_heads % world and world % config.num_kv_heads:
        problems.append(f"{config.num_kv_heads} KV heads (nor is {world} a multiple of them)")
    if config.intermediate_size % world:
        problems.append(f"intermediate size {config.intermediate_size}")
    if problems:
        raise ModelLoadError(f"tensor parallel {world} does not divide the model's {', '.join(problems)}")


def _rows(weight: torch.Tensor, heads: range, head_dim: int) -> torch.Tensor:
    return weight[heads.start * head_dim : heads.stop * head_dim]
