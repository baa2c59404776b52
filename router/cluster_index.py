"""The router's placement index: every live node's load as numpy arrays per role, corrected by its own picks.

Placement runs per request, so it must not walk 1,000 nodes in Python. The index is rebuilt from the cluster view
only when the view changed and at most every `refresh_s` (load reports arrive every ~100 ms anyway); between
rebuilds a decision costs a few vector operations plus one correction per node this router picked for recently
(reports do not show those picks yet; see LoadTracker).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.state import NodeState
from router.load_tracker import LoadTracker

ROLES = ("prefill", "decode", "colocated")


_INT_COLUMNS = ("pending_tokens", "running", "free_blocks", "block_size", "cached_tokens")
_FLOAT_COLUMNS = (
    "cost_per_s",
    "idle_power_w",
    "max_power_w",
    "power_w",
    "prompt_fixed_s",
    "prompt_per_token_s",
    "token_fixed_s",
    "token_per_seq_s",
)


@dataclass(slots=True)
class RoleArrays:
    """One role's nodes; position i of every array is node node_ids[i].

    The router fills these from the cluster view; the simulator (ops/sim) keeps its own machines in the same shape,
    so that both run the very same policy code."""

    node_ids: list[str]
    pending_tokens: np.ndarray  # int64: queued prompt tokens (+ this router's unreported picks)
    running: np.ndarray  # int64
    free_blocks: np.ndarray  # int64
    block_size: np.ndarray  # int64
    # int64, per request: leading tokens of this request's prompt whose KV the node holds in its prefix cache (from
    # the nodes' KV events, router/kv_index.py; 0 where unknown). Policies subtract them from the work to do.
    cached_tokens: np.ndarray
    usable: np.ndarray  # bool: not draining and not excluded for this request
    # float64 columns, from the node's registration (machine type, PerfSummary) and load report (power_w):
    cost_per_s: np.ndarray  # USD per second of the whole machine
    idle_power_w: np.ndarray
    max_power_w: np.ndarray  # the cap when capped, else the rating
    power_w: np.ndarray  # draw now (measured or modeled)
    prompt_fixed_s: (
        np.ndarray
    )  # prefill iteration ~ prompt_fixed_s + prompt_per_token_s * batch prompt tokens
    prompt_per_token_s: np.ndarray
    token_fixed_s: np.ndarray  # decode iteration ~ token_fixed_s + token_per_seq_s * batch size
    token_per_seq_s: np.ndarray

    def __len__(self) -> int:
        return len(self.node_ids)

    @classmethod
    def build(cls, node_ids: list[str], **columns: Iterable[float] | np.ndarray) -> RoleArrays:
        """Arrays for node_ids; a column not given is 0 (usable: True, block_size: 1)."""
        n = len(node_ids)

        def column(name: str, dtype: type, default: float) -> np.ndarray:
            values = columns.pop(name, None)
            if values is None:
                return np.full(n, default, dtype=dtype)
            array: np.ndarray = np.asarray(
                values if isinstance(values, np.ndarray) else list(values), dtype=dtype
            )
            if array.shape != (n,):
                raise ValueError(f"column {name} has shape {array.shape}, expected ({n},)")
            return array

        ints = {name: column(name, np.int64, 1 if name == "block_size" else 0) for name in _INT_COLUMNS}
        floats = {name: column(name, np.float64, 0.0) for name in _FLOAT_COLUMNS}
        usable = column("usable", bool, True)
        if columns:
            raise TypeError(f"unknown column(s) {sorted(columns)}")
        return cls(list(node_ids), usable=usable, **ints, **floats)

    def copy(self) -> RoleArrays:
        """Copies of the columns a request-time correction changes; the fixed ones are shared."""
        out = copy.copy(self)
        out.pending_tokens = self.pending_tokens.copy()
        out.running = self.running.copy()
        out.free_blocks = self.free_blocks.copy()
        out.cached_tokens = self.cached_tokens.copy()
        out.usable = self.usable.copy()
        return out


class ClusterIndex:
    def __init__(self, refresh_s: float = 0.005) -> None:
        self.refresh_s = refresh_s
        self._source: Sequence[NodeState] | None = None
        self._built_at = float("-inf")
        self._base: dict[str, RoleArrays] = {role: _arrays([]) for role in ROLES}
        self._where: dict[str, tuple[str, int]] = {}  # node id -> (role, position)
        self._reported_at: dict[str, float] = {}  # node id -> timestamp of the load report the arrays hold
        self.block_sizes: frozenset[int] = frozenset()  # the distinct KV block sizes of the nodes indexed

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
        self.block_sizes = frozenset(s.info.block_size for s in states)

    def for_request(
        self,
        tracker: LoadTracker,
        exclude: Iterable[str] = (),
        cached_tokens: Mapping[str, int] | None = None,
    ) -> dict[str, RoleArrays]:
        """Per-role arrays corrected by the tracker's unreported picks, with excluded nodes marked unusable and
        cached_tokens (node id -> prompt tokens it holds) filled in."""
        out = {role: arrays.copy() for role, arrays in self._base.items()}
        for node_id, tokens in (cached_tokens or {}).items():
            role, i = self._where.get(node_id, ("", -1))
            if i >= 0:
                out[role].cached_tokens[i] = tokens
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
    infos = [s.info for s in states]
    loads = [s.load for s in states]
    perf = np.array([info.perf for info in infos], dtype=np.float64).reshape(len(states), 4)
    return RoleArrays.build(
        [info.node_id for info in infos],
        pending_tokens=(load.queued_prompt_tokens if load else 0 for load in loads),
        running=(load.running_requests if load else 0 for load in loads),
        free_blocks=(
            load.free_kv_blocks if load else info.kv_capacity_blocks
            for info, load in zip(infos, loads, strict=True)
        ),
        block_size=(info.block_size for info in infos),
        usable=(not (load and load.draining) for load in loads),
        cost_per_s=(info.cost_per_hour / 3600.0 for info in infos),
        idle_power_w=(info.idle_power_w for info in infos),
        max_power_w=(info.max_power_w for info in infos),
        # A node whose reports stopped is assumed to draw its idle power.
        power_w=(
            load.power_w if load else info.idle_power_w for info, load in zip(infos, loads, strict=True)
        ),
        prompt_fixed_s=perf[:, 0],
        prompt_per_token_s=perf[:, 1],
        token_fixed_s=perf[:, 2],
        token_per_seq_s=perf[:, 3],
    )
