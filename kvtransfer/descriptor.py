"""A node's transport descriptor: the bytes a peer needs to connect, as published in the cluster state.

Encoding: the magic b"SSKV", a format version byte, the length of a JSON header (4 bytes, big-endian), the UTF-8
JSON header (every field but agent_metadata), then agent_metadata as raw bytes. Each backend fills the fields it
needs and leaves the others at their defaults.

A tensor-parallel node publishes, besides its own descriptor (the whole-heads transfer pool), one descriptor per rank
(`tp_ranks`: each rank's own pool and the KV heads it holds), so that a peer of the same degree can write rank to
rank (cluster/node/rank_kv.py). Peers that do not know about ranks ignore them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from dataclasses import dataclass

from kvtransfer.base import TransferError
from kvtransfer.layout import KVLayout

_MAGIC = b"SSKV"
_VERSION = 1
_PREFIX = struct.Struct(">4sBI")


@dataclass(frozen=True, slots=True)
class RankDescriptor:
    """One tensor-parallel rank of a node: its own transport's descriptor and the KV heads [start, stop) it holds."""

    descriptor: bytes
    kv_heads: tuple[int, int]


@dataclass(frozen=True, slots=True)
class NodeDescriptor:
    backend: str  # the transport that produced it ("nixl", "torch"); a peer of another backend cannot connect
    node_id: str  # unique node id; the PeerId under which peers know this node
    layout: KVLayout  # the node's registered pool
    device: str  # "cpu" or "cuda": where the pool lives
    endpoint: str = ""  # torch: "host:port" of the TCPStore this node hosts for pairing
    layer_addresses: tuple[int, ...] = ()  # nixl: base address of each layer's registered tensor
    device_index: int = 0  # nixl: GPU index of a VRAM pool (0 for DRAM)
    agent_metadata: bytes = b""  # nixl: the agent's metadata (nixl_agent.get_agent_metadata())
    tp_ranks: tuple[RankDescriptor, ...] = ()  # a tensor-parallel node's ranks, rank 0 first (empty at TP 1)

    def to_bytes(self) -> bytes:
        header = {
            "backend": self.backend,
            "node_id": self.node_id,
            "layout": json.loads(self.layout.to_json()),
            "device": self.device,
            "endpoint": self.endpoint,
            "layer_addresses": list(self.layer_addresses),
            "device_index": self.device_index,
            "tp_ranks": [
                {"descriptor": base64.b64encode(r.descriptor).decode(), "kv_heads": list(r.kv_heads)}
                for r in self.tp_ranks
            ],
        }
        encoded = json.dumps(header, sort_keys=True).encode()
        return _PREFIX.pack(_MAGIC, _VERSION, len(encoded)) + encoded + self.agent_metadata

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeDescriptor:
        """Decode to_bytes' output; TransferError naming the problem if it is not a valid descriptor."""
        if len(data) < _PREFIX.size:
            raise TransferError(f"malformed KV transport descriptor: only {len(data)} bytes")
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise TransferError(f"not a KV transport descriptor of version {_VERSION} (magic {magic!r})")
        try:
            header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
            return cls(
                backend=str(header["backend"]),
                node_id=str(header["node_id"]),
                layout=KVLayout.from_json(json.dumps(header["layout"])),
                device=str(header["device"]),
                endpoint=str(header["endpoint"]),
                layer_addresses=tuple(int(a) for a in header["layer_addresses"]),
                device_index=int(header["device_index"]),
                agent_metadata=bytes(data[_PREFIX.size + header_len :]),
                tp_ranks=tuple(
                    RankDescriptor(
                        base64.b64decode(r["descriptor"]), (int(r["kv_heads"][0]), int(r["kv_heads"][1]))
                    )
                    for r in header.get("tp_ranks", [])
                ),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise TransferError(f"malformed KV transport descriptor: {exc}") from exc


def with_tp_ranks(descriptor: bytes, ranks: tuple[RankDescriptor, ...]) -> bytes:
    """A node's descriptor (to_bytes output) with its tensor-parallel ranks' descriptors added."""
    return dataclasses.replace(NodeDescriptor.from_bytes(descriptor), tp_ranks=ranks).to_bytes()


def check_peer(
    peer: NodeDescriptor, backend: str, node_id: str, layout: KVLayout, head_slices: bool = False
) -> None:
    """TransferError unless a node (backend, node_id, layout) can exchange blocks (or, with head_slices, slices
    of their KV heads) with the described peer."""
    if peer.backend != backend:
        raise TransferError(
            f"peer {peer.node_id!r} uses the {peer.backend!r} KV transport, this node {backend!r}"
        )
    if peer.node_id == node_id:
        raise TransferError(f"node {node_id!r} cannot connect to itself")
    reason = layout.compatible_with(peer.layout, head_slices)
    if reason is not None:
        raise TransferError(f"cannot connect to {peer.node_id!r}: {reason}")
