"""Hung or dead nodes, seen from the router: an attempt's waits on its nodes end when one of them leaves the view.

Every node renews a 2 s lease in Redis from its own process (cluster/state); a node that is killed, paused
(SIGSTOP) or cut off stops renewing it and drops out of the router's ClusterView 1.5-2 s later. `NodeWatch` checks,
ten times a second on the router's event loop, the nodes that in-flight attempts use; a node absent from the view
for `grace_s` (one heartbeat interval) is lost, and each attempt using it is told: about 2.5 s after it stopped.
The grace keeps a restarted Redis (the view misses every node until its next heartbeat registers it again) from
looking like every node died at once; a node back within it (a pause shorter than its lease, say) just goes on.

An attempt bounds every wait on a node with `Liveness.bounded(node_id, what, timeout_s)`: the wait ends with
`NodeLost` when the timeout passes or the moment a watched node is lost, whichever comes first. The bound covers only
the wait itself, never the time the request's own consumer holds a yielded message, so a slow client is never taken
for a hung node and the cancellation never lands outside the wait it was meant for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

from cluster.state import ClusterView, NodeState

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
MISSING_GRACE_S = 0.5  # a node's heartbeat interval (its lease TTL / 4)


class NodeLost(Exception):
    """A wait on a node ended early: `node_id` left the cluster view, or did not answer within the wait's bound."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id


class Liveness:
    """One attempt's view of its nodes' health: which node was lost (if any), and the wait it is in."""

    def __init__(self, nodes: set[str]) -> None:
        self.nodes = nodes  # the ids of the nodes the attempt waits on
        self.lost: NodeLost | None = None
        self._scope: asyncio.Timeout | None = None

    def node_lost(self, node_id: str, reason: str) -> None:
        if self.lost is None:
            self.lost = NodeLost(node_id, reason)
        if self._scope is not None and not self._scope.expired():
            self._scope.reschedule(asyncio.get_running_loop().time())  # end the current wait now

    def release(self, node_id: str) -> None:
        """Stop watching node_id (the attempt no longer needs it); a loss already seen of it is forgotten."""
        self.nodes.discard(node_id)
        if self.lost is not None and self.lost.node_id == node_id:
            self.lost = None

    @contextlib.asynccontextmanager
    async def bounded(self, node_id: str, what: str, timeout_s: float | None) -> AsyncIterator[None]:
        """Run one wait on `node_id`; NodeLost if it passes timeout_s or a watched node is lost meanwhile."""
        if self.lost is not None:
            raise self.lost
        try:
            async with asyncio.timeout(timeout_s) as scope:
                self._scope = scope
                try:
                    yield
                finally:
                    self._scope = None
        except TimeoutError as exc:
            if self.lost is not None:
                raise self.lost from exc
            raise NodeLost(
                node_id, f"{what} on node {node_id} gave no answer within {timeout_s:.1f} s"
            ) from exc


class NodeWatch:
    """Tells in-flight attempts when a node they use leaves the cluster view; one task for the whole router."""

    def __init__(
        self, view: ClusterView, interval_s: float = WATCH_INTERVAL_S, grace_s: float = MISSING_GRACE_S
    ) -> None:
        self.view = view
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._watched: set[Liveness] = set()
        self._missing_since: dict[
            str, float
        ] = {}  # watched node id -> when the view was first seen without it
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, *nodes: NodeState) -> Iterator[Liveness]:
        """The Liveness of one attempt on these nodes, watched until the block ends."""
        liveness = Liveness({n.info.node_id for n in nodes})
        self._watched.add(liveness)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="node-watch")
        try:
            yield liveness
        finally:
            self._watched.discard(liveness)

    async def _run(self) -> None:
        while self._watched:
            try:
                self.check()
            except Exception:  # a bug here must not stop watching the next attempts
                logger.exception("node watch failed")
            await asyncio.sleep(self.interval_s)

    def check(self) -> None:
        """Tell each watched attempt about its nodes that have been out of the view for the grace period."""
        now = time.monotonic()
        watched = {node_id for liveness in self._watched for node_id in liveness.nodes}
        missing = {node_id for node_id in watched if self.view.get(node_id) is None}
        self._missing_since = {n: self._missing_since.get(n, now) for n in missing}
        lost = {n for n, since in self._missing_since.items() if now - since >= self.grace_s}
        for liveness in list(self._watched):
            for node_id in liveness.nodes & lost:
                liveness.node_lost(node_id, f"node {node_id} left the cluster (its lease lapsed)")
