"""The prefix-cache key of a full KV block: a hash chain over token ids, the same in every process of a cluster.

Block i's key is block_key(key of block i-1, its block_size token ids), starting from ROOT_KEY, so equal keys mean
equal whole prefixes. Engines key their prefix caches with it (engine/block_manager.py) and publish the keys they
hold; routers hash a prompt the same way to find the node holding most of it (router/kv_policy.py). So the function
must not depend on the process: it is BLAKE2b over the parent key and the token ids as little-endian int32, cut to
63 bits (a non-negative int that JSON, Redis and numpy carry unchanged). Torch-free, so the router can import it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from hashlib import blake2b

ROOT_KEY = 0x5EED
_MASK = (1 << 63) - 1


def block_key(parent: int, tokens: Sequence[int]) -> int:
    digest = blake2b(parent.to_bytes(8, "little") + array("i", tokens).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def chain(tokens: Sequence[int], block_size: int, max_blocks: int | None = None) -> Iterator[int]:
    """The keys of tokens' full blocks in order (at most max_blocks of them)."""
    full = len(tokens) // block_size
    if max_blocks is not None:
        full = min(full, max_blocks)
    key = ROOT_KEY
    for i in range(full):
        key = block_key(key, tokens[i * block_size : (i + 1) * block_size])
        yield key
