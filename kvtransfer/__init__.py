"""KV transfer between nodes: the pool's byte layout, the transport contract, and its NIXL and torch backends.

`create_transport("nixl" | "torch", node_id, ...)` builds a node's transport; kvtransfer.base documents the
protocol (register, local_descriptor, connect, write_blocks, poll/wait, notifications, close). Backends live in
kvtransfer.backends, one module each, imported only when named.
"""

from kvtransfer.base import (
    KVTransport,
    PeerId,
    TransferError,
    TransferHandle,
    TransferState,
    TransferTimeout,
)
from kvtransfer.factory import BACKENDS, create_transport
from kvtransfer.layout import BlockRun, HeadSlice, KVLayout, coalesce_block_pairs

__all__ = [
    "BACKENDS",
    "BlockRun",
    "HeadSlice",
    "KVLayout",
    "KVTransport",
    "PeerId",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "TransferTimeout",
    "coalesce_block_pairs",
    "create_transport",
]
