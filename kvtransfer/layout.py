"""The paged KV pool as bytes: which byte range of which layer tensor holds a block, and when two pools can exchange.

A node's pool is one tensor per transformer layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`, contiguous
(engine.kernels describes it). Block b of a layer is therefore the contiguous byte range
`[b * block_bytes, (b + 1) * block_bytes)` of that layer's tensor, K then V. A prefill node can write its blocks
into a decode node's blocks when both pools agree on everything but their number of blocks.

Tensor-parallel ranks of different degrees hold different KV heads: a rank writes only some heads of its blocks
into some heads of the peer rank's blocks (a HeadSlice). Then the pools may also differ in their number of KV heads,
and each block's slice is 2 x block_size runs of `count x head_dim` elements (heads are the second-to-last dim).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

# Cache dtypes the engine supports, by the name used in descriptors, with their element sizes.
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields that must match between a sender's and a receiver's pool (num_blocks may differ).
_MUST_MATCH = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape and dtype of a node's whole paged KV pool; validated on construction (ValueError)."""

    num_layers: int  # transformer layers, one pool tensor each
    num_blocks: int  # blocks per layer tensor
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16" or "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """Shape of one block of one layer: (2, block_size, num_kv_heads, head_dim)."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def write_bytes(self, num_blocks: int, heads: HeadSlice | None = None) -> int:
        """Bytes a write of num_blocks blocks moves: whole blocks, or a head slice of each."""
        return num_blocks * (self.block_bytes if heads is None else heads.bytes_per_block(self))

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def byte_range(self, layer: int, block: int) -> tuple[int, int]:
        """(offset, length) of a block within its layer's tensor; the offset does not depend on the layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.num_layers})")
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} is out of range [0, {self.num_blocks})")
        return block * self.block_bytes, self.block_bytes

    def compatible_with(self, other: KVLayout, head_slices: bool = False) -> str | None:
        """Why blocks of this pool cannot be copied into other's (or back), or None when they can. head_slices:
        the two exchange slices of heads (HeadSlice), so their numbers of KV heads may differ."""
        differences = [
            f"{name} {getattr(self, name)} here vs {getattr(other, name)} at the peer"
            for name in _MUST_MATCH
            if getattr(self, name) != getattr(other, name) and not (head_slices and name == "num_kv_heads")
        ]
        return "incompatible KV layouts: " + ", ".join(differences) if differences else None

    @classmethod
    def from_kv_layers(cls, kv_layers: Sequence[torch.Tensor]) -> KVLayout:
        """The layout of an engine's pool (engine.kv_layers); ValueError unless it is a well-formed pool."""
        if not kv_layers:
            raise ValueError("the KV pool has no layers")
        first = kv_layers[0]
        dtype_name = next((name for name, dt in _TORCH_DTYPES.items() if dt == first.dtype), None)
        if dtype_name is None:
            raise ValueError(f"KV pool dtype {first.dtype} is not one of {sorted(DTYPE_SIZES)}")
        if first.dim() != 5 or first.shape[1] != 2:
            raise ValueError(
                "each KV layer must have shape [num_blocks, 2, block_size, num_kv_heads, head_dim], "
                f"got {tuple(first.shape)}"
            )
        for index, layer in enumerate(kv_layers):
            if layer.shape != first.shape or layer.dtype != first.dtype or layer.device != first.device:
                raise ValueError(
                    f"KV layer {index} is {tuple(layer.shape)} {layer.dtype} on {layer.device}, layer 0 is "
                    f"{tuple(first.shape)} {first.dtype} on {first.device}: all layers must match"
                )
            if not layer.is_contiguous():
                raise ValueError(f"KV layer {index} is not contiguous: blocks would not be byte ranges")
        num_blocks, _, block_size, num_kv_heads, head_dim = first.shape
        return cls(len(kv_layers), num_blocks, block_size, num_kv_heads, head_dim, dtype_name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> KVLayout:
        """Parse to_json's output; ValueError if it is not a complete, valid layout."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"KV layout is not valid JSON: {exc}") from exc
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            raise ValueError(f"KV layout JSON must have exactly the keys {sorted(expected)}, got {data!r}")
        return cls(**data)

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KVLayout:
        return cls.from_json(data)


@dataclass(frozen=True, slots=True)
class HeadSlice:
    """KV heads [src_start, src_start + count) of each source block, written into heads [dst_start, dst_start +
    count) of its destination block; the rest of the destination block is left as it is."""

    src_start: int
    dst_start: int
    count: int

    def check(self, src_heads: int, dst_heads: int) -> None:
        """ValueError unless the slice lies within both pools' KV heads."""
        values = (self.src_start, self.dst_start, self.count)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values) or self.count < 1:
            raise ValueError(f"a head slice needs integer starts and a positive count, got {self}")
        if not 0 <= self.src_start <= src_heads - self.count:
            raise ValueError(
                f"source heads {self.src_start}+{self.count} exceed the {src_heads} KV heads here"
            )
        if not 0 <= self.dst_start <= dst_heads - self.count:
            raise ValueError(f"destination heads {self.dst_start}+{self.count} exceed the peer's {dst_heads}")

    def bytes_per_block(self, layout: KVLayout) -> int:
        return 2 * layout.block_size * self.count * layout.head_dim * layout.element_size


@dataclass(frozen=True, slots=True)
class BlockRun:
    """`length` consecutive blocks starting at src_start, copied to `length` consecutive blocks at dst_start."""

    src_start: int
    dst_start: int
    length: int


def coalesce_block_pairs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[BlockRun]:
    """Merge (src_blocks[i] -> dst_blocks[i]) pairs into runs consecutive on both sides, keeping the given order.

    A run grows while the next pair continues both the source and the destination by one block, so
    [4, 5, 6, 9] -> [0, 1, 2, 3] gives runs (4 -> 0, 3) and (9 -> 3, 1). Each run is one byte range per layer on
    either side, hence one transfer descriptor.
    """
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    runs: list[BlockRun] = []
    for src, dst in zip(src_blocks, dst_blocks, strict=True):
        last = runs[-1] if runs else None
        if last is not None and src == last.src_start + last.length and dst == last.dst_start + last.length:
            runs[-1] = BlockRun(last.src_start, last.dst_start, last.length + 1)
        else:
            runs.append(BlockRun(int(src), int(dst), 1))
    return runs
