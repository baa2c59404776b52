"""Placement: which (prefill, decode) pair, or which colocated node, serves a request. Chosen once, at arrival.

Policies see the router's in-memory snapshot of every live node plus what this router itself assigned since the
node's last load report (reports arrive every ~100 ms; without that correction a burst would all pile onto the node
that looked idlest). The default is Splitwise's join-the-shortest-queue: the prefill node with the fewest pending
prompt tokens, the decode node with the most free KV blocks that can hold the prompt. When no pair exists (a pool is
empty or full) a colocated node serves the whole request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """A node as placement sees it: identity plus load, already corrected for this router's own recent picks."""

    node_id: str
    role: str  # prefill | decode | colocated
    pending_prompt_tokens: int  # queued + assigned-but-unreported prompt tokens
    running_requests: int
    free_kv_blocks: int
    block_size: int
    draining: bool = False


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    prompt_tokens: int
    max_total_tokens: int  # prompt + max_tokens, capped by the context


@dataclass(frozen=True, slots=True)
class Placement:
    prefill: str | None = None
    decode: str | None = None
    colocated: str | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None and self.decode is not None


class PlacementPolicy(Protocol):
    name: str

    def place(
        self, request: PlacementRequest, nodes: Sequence[NodeSnapshot], exclude: Iterable[str] = ()
    ) -> Placement | None:
        """Pick nodes for a request, never one in `exclude` (nodes that already failed it); None if nothing fits."""
        ...


class JoinShortestQueue:
    """Splitwise's default: prefill by fewest pending prompt tokens, decode by most free KV blocks."""

    name = "jsq"

    def place(
        self, request: PlacementRequest, nodes: Sequence[NodeSnapshot], exclude: Iterable[str] = ()
    ) -> Placement | None:
        excluded = set(exclude)
        usable = [n for n in nodes if not n.draining and n.node_id not in excluded]
        prefill = min(
            (n for n in usable if n.role == "prefill"),
            key=lambda n: (n.pending_prompt_tokens, n.running_requests, n.node_id),
            default=None,
        )
        decode = max(
            (
                n
                for n in usable
                if n.role == "decode" and _blocks_for(request.prompt_tokens, n) <= n.free_kv_blocks
            ),
            key=lambda n: (n.free_kv_blocks, -n.running_requests, n.node_id),
            default=None,
        )
        if prefill is not None and decode is not None:
            return Placement(prefill=prefill.node_id, decode=decode.node_id)
        colocated = min(
            (n for n in usable if n.role == "colocated"),
            key=lambda n: (n.pending_prompt_tokens + n.running_requests, n.node_id),
            default=None,
        )
        return Placement(colocated=colocated.node_id) if colocated is not None else None


def _blocks_for(tokens: int, node: NodeSnapshot) -> int:
    return -(-tokens // max(1, node.block_size))


POLICIES: dict[str, type[JoinShortestQueue]] = {"jsq": JoinShortestQueue}


def create_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown placement policy {name!r} (known: {', '.join(sorted(POLICIES))})"
        ) from None
