"""This router's own picks that nodes' load reports cannot show yet.

A report is up to ~100 ms old; during a burst every request would otherwise see the same "idlest" node. Each pick is
remembered with its time until a report from after that time arrives (which then includes it) or the request's
prompt phase ends, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LoadTracker:
    def __init__(self) -> None:
        # node id -> request id -> (pick time, prompt tokens, kv blocks); only nodes with live picks are present
        self._picks: dict[str, dict[str, tuple[float, int, int]]] = {}

    def picked(self, node_id: str, request_id: str, prompt_tokens: int, kv_blocks: int) -> None:
        self._picks.setdefault(node_id, {})[request_id] = (time.time(), prompt_tokens, kv_blocks)

    def done(self, node_id: str, request_id: str) -> None:
        picks = self._picks.get(node_id)
        if picks is not None:
            picks.pop(request_id, None)
            if not picks:
                del self._picks[node_id]

    def unreported(self, reported_at: Callable[[str], float]) -> dict[str, tuple[int, int, int]]:
        """node id -> (prompt tokens, kv blocks, requests) picked after that node's last report."""
        out = {}
        for node_id, picks in self._picks.items():
            since = reported_at(node_id)
            fresh = [p for p in picks.values() if p[0] >= since]
            if fresh:
                out[node_id] = (sum(p[1] for p in fresh), sum(p[2] for p in fresh), len(fresh))
        return out
