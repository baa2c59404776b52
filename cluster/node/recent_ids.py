"""A bounded, time-limited set of request ids: what a node remembers of recent Aborts and transfers."""

from __future__ import annotations

import time
from collections import OrderedDict


class RecentIds:
    """Ids added within the last `ttl_s` seconds, at most `capacity` of them (the oldest go first)."""

    def __init__(self, ttl_s: float = 180.0, capacity: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._added: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._added[request_id] = now
        self._added.move_to_end(request_id)
        while self._added and (
            len(self._added) > self.capacity or next(iter(self._added.values())) < now - self.ttl_s
        ):
            self._added.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        added = self._added.get(request_id) if isinstance(request_id, str) else None
        return added is not None and added >= time.monotonic() - self.ttl_s

    def __len__(self) -> int:
        return len(self._added)
