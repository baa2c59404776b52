"""Corrects nodes' load reports with this router's own picks that a report cannot reflect yet.

A report is up to ~100 ms old; during a burst every request would otherwise see the same "idlest" node. Each pick is
remembered with its time until a report from after that time arrives (which then includes it) or the request's
prompt phase ends, whichever comes first.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

from ops.cluster_state import NodeState
from router.policy import NodeSnapshot


class LoadTracker:
    def __init__(self) -> None:
        # node id -> request id -> (pick time, prompt tokens, kv blocks)
        self._picks: dict[str, dict[str, tuple[float, int, int]]] = defaultdict(dict)

    def picked(self, node_id: str, request_id: str, prompt_tokens: int, kv_blocks: int) -> None:
        self._picks[node_id][request_id] = (time.time(), prompt_tokens, kv_blocks)

    def done(self, node_id: str, request_id: str) -> None:
        picks = self._picks.get(node_id)
        if picks is not None:
            picks.pop(request_id, None)

    def snapshots(self, states: Sequence[NodeState]) -> list[NodeSnapshot]:
        out = []
        for state in states:
            load = state.load
            reported_at = load.timestamp if load else 0.0
            unreported = [p for p in self._picks.get(state.info.node_id, {}).values() if p[0] >= reported_at]
            extra_tokens = sum(p[1] for p in unreported)
            extra_blocks = sum(p[2] for p in unreported)
            free = load.free_kv_blocks if load else state.info.kv_capacity_blocks
            out.append(
                NodeSnapshot(
                    node_id=state.info.node_id,
                    role=state.info.role,
                    pending_prompt_tokens=(load.queued_prompt_tokens if load else 0) + extra_tokens,
                    running_requests=(load.running_requests if load else 0) + len(unreported),
                    free_kv_blocks=max(0, free - extra_blocks),
                    block_size=state.info.block_size,
                    draining=bool(load and load.draining),
                )
            )
        return out
