"""What a pair puts on the wire: the write header (through the store) and the gloo group (the bytes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DATA_TAG = 0  # block bytes
BYE_TAG = 1  # one byte, sent once by the side that closes first and answered by the other
# Blocking store pops and watcher recvs wait this long; close() or a hang-up wakes them first. Longer waits overflow
# nanosecond deadlines inside gloo.
IDLE = timedelta(days=30)
DIST_ERRORS = (RuntimeError, dist.DistError)  # gloo raises RuntimeError, the TCPStore DistError subclasses

# magic, sequence number, layer, block count, run count, notify length (-1: none), the destination's first KV head
# and the head count of a head slice (-1, -1: whole blocks); then the destination ids and the run lengths (int32
# each) and the notify bytes.
_FIXED = struct.Struct("<4sqiiiiii")
_MAGIC = b"KVW3"


@dataclass(frozen=True, slots=True)
class WriteHeader:
    seq: int  # 0, 1, 2, ... per pair: a gap means a lost write
    layer: int
    dst_blocks: tuple[int, ...]
    # Lengths of the runs (consecutive on both sides) sent as one gloo message each, in order, straight from and
    # into the pools; empty when the blocks come as a single gathered message instead.
    runs: tuple[int, ...]
    notify: bytes | None
    # A head slice: (first KV head in the destination blocks, head count); the message holds only those heads.
    heads: tuple[int, int] | None = None

    def encode(self) -> bytes:
        notify_len = -1 if self.notify is None else len(self.notify)
        counts = (len(self.dst_blocks), len(self.runs))
        heads = self.heads or (-1, -1)
        fixed = _FIXED.pack(_MAGIC, self.seq, self.layer, *counts, notify_len, *heads)
        ints = struct.pack(f"<{sum(counts)}i", *self.dst_blocks, *self.runs)
        return fixed + ints + (self.notify or b"")

    @classmethod
    def decode(cls, data: bytes) -> WriteHeader:
        """ValueError if data is not an encoded header."""
        try:
            magic, seq, layer, num_dst, num_runs, notify_len, head, head_count = _FIXED.unpack_from(data)
            ints_end = _FIXED.size + 4 * (num_dst + num_runs)
            if magic != _MAGIC or min(num_dst, num_runs) < 0 or len(data) != ints_end + max(notify_len, 0):
                raise ValueError("bad magic or length")
            ints = struct.unpack_from(f"<{num_dst + num_runs}i", data, _FIXED.size)
        except (struct.error, ValueError) as exc:
            raise ValueError(f"malformed write header ({len(data)} bytes): {exc}") from None
        notify = None if notify_len < 0 else bytes(data[ints_end:])
        heads = None if head_count < 0 else (head, head_count)
        return cls(seq, layer, ints[:num_dst], ints[num_dst:], notify, heads)


def gloo_pair(store: Any, key: str, rank: int, host: str, timeout_s: float) -> Any:
    """The two-rank gloo group of pair `key`; blocks (at most timeout_s) until the other side joins."""
    prefixed = dist.PrefixStore(f"kv/pair/{key}/pg", store)
    # _Options is the only way to bind gloo to the address peers know this node by.
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, options)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view: gloo moves every dtype this way, fp8 included."""
    return tensor.reshape(-1).view(torch.uint8)
