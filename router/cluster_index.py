"""The router's placement index: every live node's load as numpy arrays per role, corrected by its own picks.

Placement runs per request, so it must not walk 1,000 nodes in Python. The index is rebuilt from the cluster view
only when the view changed and at most every `refresh_s` (load reports arrive every ~100 ms anyway); between
rebuilds a decision costs a few vector operations plus one correction per node this router picked for recently
(reports do not show those picks yet; see LoadTracker).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ops.cluster_state import NodeState
from router.load_tracker import LoadTracker

ROLES = ("prefill", "decode", "colocated")


@dataclass(slots=True)
class RoleArrays:
    """One role's nodes; position i of every array is node node_ids[i]."""

    node_ids: list[str]
    pending_tokens: np.ndarray  # int64: queued prompt tokens (+ this router's unreported picks)
    running: np.ndarray  # int64
    free_blocks: np.ndarray  # int64
    block_size: np.ndarray  # int64
    usable: np.ndarray  # bool: not draining and not excluded for this request

    def __len__(self) -> int:
        return len(self.node_ids)


class ClusterIndex:
    def __init__(self, refresh_s: float = 0.005) -> None:
        self.refresh_s = refresh_s
        self._source: Sequence[NodeState] | None = None
        self._built_at = float("-inf")
        self._base: dict[str, RoleArrays] = {role: _arrays([]) for role in ROLES}
        self._where: dict[str, tuple[str, int]] = {}  # node id -> (role, position)
        self._reported_at: dict[str, float] = {}  # node id -> timestamp of the load report the arrays hold

    def update(self, states: Sequence[NodeState]) -> None:
        """Adopt a new view snapshot (the view hands out a new tuple after any change), rate-limited."""
        if states is self._source:
            return
        now = time.monotonic()
        if now - self._built_at < self.refresh_s and self._source is not None:
            return
        self._source, self._built_at = states, now
        by_role: dict[str, list[NodeState]] = {role: [] for role in ROLES}
        for state in states:
            by_role.setdefault(state.info.role, []).append(state)
        self._base = {role: _arrays(by_role[role]) for role in ROLES}
        self._where = {
            node_id: (role, i)
            for role, arrays in self._base.items()
            for i, node_id in enumerate(arrays.node_ids)
        }
        self._reported_at = {s.info.node_id: (s.load.timestamp if s.load else 0.0) for s in states}

    def for_request(self, tracker: LoadTracker, exclude: Iterable[str] = ()) -> dict[str, RoleArrays]:
        """Per-role arrays corrected by the tracker's unreported picks, with excluded nodes marked unusable."""
        out = {role: _copy(arrays) for role, arrays in self._base.items()}
        reported_at = self._reported_at
        for node_id, (tokens, blocks, count) in tracker.unreported(lambda n: reported_at.get(n, 0.0)).items():
            role, i = self._where.get(node_id, ("", -1))
            if i >= 0:
                arrays = out[role]
                arrays.pending_tokens[i] += tokens
                arrays.free_blocks[i] = max(0, int(arrays.free_blocks[i]) - blocks)
                arrays.running[i] += count
        for node_id in exclude:
            role, i = self._where.get(node_id, ("", -1))
            if i >= 0:
                out[role].usable[i] = False
        return out


def _arrays(states: list[NodeState]) -> RoleArrays:
    def column(values: Iterable[int]) -> np.ndarray:
        return np.fromiter(values, dtype=np.int64, count=len(states))

    return RoleArrays(
        node_ids=[s.info.node_id for s in states],
        pending_tokens=column(s.load.queued_prompt_tokens if s.load else 0 for s in states),
        running=column(s.load.running_requests if s.load else 0 for s in states),
        free_blocks=column(s.load.free_kv_blocks if s.load else s.info.kv_capacity_blocks for s in states),
        block_size=column(s.info.block_size for s in states),
        usable=np.fromiter((not (s.load and s.load.draining) for s in states), dtype=bool, count=len(states)),
    )


def _copy(arrays: RoleArrays) -> RoleArrays:
    return RoleArrays(
        arrays.node_ids,
        arrays.pending_tokens.copy(),
        arrays.running.copy(),
        arrays.free_blocks.copy(),
        arrays.block_size,
        arrays.usable.copy(),
    )
