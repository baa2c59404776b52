"""Which prefix-cache keys an engine gained and lost since someone last asked: what a node publishes to routers.

The block manager records each key it starts or stops offering (engine/block_manager.py) on the engine thread; the
node's publisher drains the log from its own thread (cluster/state/kv_events.py). Between drains only each key's last
change is kept, so a key stored and evicted again within one interval costs nothing, and the log never holds more
entries than there are distinct keys changed (at most the pool's blocks per change of the whole pool).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    stored: list[int]  # keys now offered
    removed: list[int]  # keys no longer offered


class KVEventLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: dict[int, bool] = {}  # key -> offered after its last change
        # The keys offered now: the block manager's own cache index says the same, but it belongs to the engine
        # thread; this copy, under the lock, is what the publisher's thread may read (snapshot) at any time.
        self._offered: set[int] = set()

    def stored(self, key: int) -> None:
        with self._lock:
            self._changes[key] = True
            self._offered.add(key)

    def removed(self, key: int) -> None:
        with self._lock:
            self._changes[key] = False
            self._offered.discard(key)

    def drain(self) -> KVEventBatch:
        """The net changes since the previous drain."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return KVEventBatch(
            stored=[key for key, offered in changes.items() if offered],
            removed=[key for key, offered in changes.items() if not offered],
        )

    def snapshot(self) -> list[int]:
        """Every key offered now, and forget pending changes (a snapshot supersedes them)."""
        with self._lock:
            self._changes = {}
            return list(self._offered)
