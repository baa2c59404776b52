"""The whole-heads KV pool a tensor-parallel prefill or decode node exchanges with peers that publish no ranks, and
through which nodes lend each other prefix blocks, kept in step with the ranks' own pools.

Each rank's pool holds only its KV heads. Other nodes, at whatever TP degree, see one pool with every KV head: the
layout of a TP 1 node, so any prefill TP p can send to any decode TP d and the transport and its layout checks stay
as they are. Rank 0 keeps that pool (the transfer pool, registered with the node's transport, same block ids as
every rank's pool) and re-shards through the ranks' gloo group:
- prefill role: right after a layer's KV of a step is stored, every rank sends rank 0 the rows it stored (gather);
  rank 0 puts them, whole heads, at the same slots of the transfer pool, then the layer hook ships them.
- blocks that arrive from outside (a decode node's received prompt, a prefill node's pulled prefix) are queued and,
  at the start of the next step, broadcast from rank 0; every rank copies its heads into its own pool.
- blocks leaving a decode node (a prefix it sends back, computed by its ranks) are first gathered into the pool.
With more ranks than KV heads a head is replicated: rank 0 takes it from the first rank that holds it.
Cost: rank 0 holds a second pool (inside the node's KV memory budget: fewer blocks), and each transferred byte
crosses the ranks' group once more. Prompts' KV between nodes with ranks skips it: each rank writes its heads to
the peer ranks holding them (cluster/node/rank_kv.py), and a prefill step mirrors only the rows of requests that
leave through the pool (StepInputs.mirror_slots; blocks exempted then are gathered if they are sent from it later).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.tensor_parallel.comm import TPComm
from engine.tensor_parallel.plan import TPPlan

LayerHook = Callable[[int], None]


def stacked_blocks(layers: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Blocks `block_ids` of every layer of a pool, as one tensor [layers, n, 2, block_size, KV heads, D]."""
    index = torch.tensor(block_ids, dtype=torch.long, device=layers[0].device)
    return torch.stack([layer.index_select(0, index) for layer in layers])


@dataclass(frozen=True, slots=True)
class GatherBlocks:
    """Announced to the worker ranks outside a step: send rank 0 your pool's blocks `block_ids`, every layer."""

    block_ids: list[int]


class KVResharding:
    """One rank's part in keeping the transfer pool (rank 0 only) and the ranks' own pools in step."""

    def __init__(
        self, config: ModelConfig, comm: TPComm, mirror_stored: bool, pool_like: torch.Tensor
    ) -> None:
        self.comm = comm
        self.rank, self.world = comm.rank, comm.world
        self.mirror_stored = mirror_stored  # the prefill role: every stored row goes to the transfer pool
        self.heads = [TPPlan(config, r, self.world).kv_heads for r in range(self.world)]
        # Whole head h comes from the first rank holding it, at that rank's local index.
        self._sources = [
            next((r, h - heads.start) for r, heads in enumerate(self.heads) if h in heads)
            for h in range(config.num_kv_heads)
        ]
        self.pool: list[torch.Tensor] = []
        if self.rank == 0:
            nb, _, bs, _, d = pool_like.shape
            shape = (nb, 2, bs, config.num_kv_heads, d)
            self.pool = [
                torch.zeros(shape, dtype=pool_like.dtype, device=pool_like.device)
                for _ in range(config.num_layers)
            ]
        self._queued: list[int] = []

    # ---- rank 0's bookkeeping ---------------------------------------------------------------------------------------

    def queue_import(self, block_ids: list[int]) -> None:
        """Blocks written into the transfer pool from outside: every rank takes its heads at the next step."""
        self._queued.extend(block_ids)

    def take_imports(self) -> list[int]:
        queued, self._queued = self._queued, []
        return list(dict.fromkeys(queued))

    # ---- run by every rank, in step ---------------------------------------------------------------------------------

    def import_blocks(self, block_ids: list[int], kv_caches: list[torch.Tensor]) -> None:
        """Rank 0's transfer-pool blocks, every layer, into each rank's pool (its heads)."""
        if self.rank == 0:
            data = stacked_blocks(self.pool, block_ids)
        else:
            _, two, bs, _, d = kv_caches[0].shape
            whole = len(self._sources)
            data = kv_caches[0].new_empty((len(kv_caches), len(block_ids), two, bs, whole, d))
        self.comm.broadcast_(data)
        mine = self.heads[self.rank]
        index = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
        for layer, cache in enumerate(kv_caches):
            cache.index_copy_(0, index, data[layer, :, :, :, mine.start : mine.stop])

    def gather_blocks(self, block_ids: list[int], kv_caches: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Every rank's blocks [layers, n, 2, block_size, its KV heads, D], in rank order, on rank 0 (else None)."""
        return self.comm.gather_to_first(stacked_blocks(kv_caches, block_ids))

    def export_blocks(self, block_ids: list[int], kv_caches: list[torch.Tensor]) -> None:
        """The ranks' blocks, whole heads, into the transfer pool (before rank 0's transport reads them)."""
        parts = self.gather_blocks(block_ids, kv_caches)
        if parts is None:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.pool[0].device)
        whole = self.whole_heads(parts)
        for layer, pool in enumerate(self.pool):
            pool.index_copy_(0, index, whole[layer])

    def mirroring(
        self, hook: LayerHook | None, slot_mapping: torch.Tensor, kv_caches: list[torch.Tensor]
    ) -> LayerHook | None:
        """The layer hook every rank runs in a prefill-role step: mirror the stored rows, then rank 0's own hook."""
        if not self.mirror_stored or slot_mapping.numel() == 0:
            return hook
        block_size = kv_caches[0].shape[2]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size

        def on_layer_stored(layer: int) -> None:
            rows = kv_caches[layer][blocks, :, offsets]  # [T, 2, local KV heads, D]
            parts = self.comm.gather_to_first(rows)
            if parts is not None:
                self.pool[layer][blocks, :, offsets] = self.whole_heads(parts)
            if hook is not None:
                hook(layer)

        return on_layer_stored

    def whole_heads(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-rank tensors whose second-to-last dimension is the rank's KV heads -> one with every KV head."""
        return torch.cat([parts[r][..., i : i + 1, :] for r, i in self._sources], dim=-2)
