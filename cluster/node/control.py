"""A node's side of operator control (cluster/state/control.py): drain, resume, and moving to another pool.

1. While the node serves, `ControlWatcher.wait_for_move` polls the node's control key every 0.25 s (the Redis call
   on a worker thread, never on the event loop). drain=true drains the node in place: it stays up and registered
   but takes nothing new (UNAVAILABLE, health NOT_SERVING, `draining` in its load reports, so routers skip it);
   drain=false, or no control at all, makes it serve again. Each change prints one JSON line, `draining` or
   `resumed`.
2. pool=<another role> ends the wait with that role (pool = the node's own role is ignored). run_node then drains,
   deregisters and shuts down exactly as on SIGTERM (a tensor-parallel node's worker ranks stop with its engine),
   prints `moving`, and raises `MoveToPool`.
3. The command line (ops/cli_commands.py) catches it and calls `exec_in_role`: the process replaces itself with
   `python -m ops.cli <new role> <the same flags>`, keeping its pid (launchers keep tracking it) and its stdout
   (the new process prints its `ready` line there). A node started with --node-id keeps it; otherwise the new
   process picks a fresh id of its new role.

A Redis error or a control that does not decode is logged once and retried, backing off up to every 2 s while it
lasts: the watcher never stops the node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

from cluster.state import NodeControl, Role

logger = logging.getLogger(__name__)

POLL_S = 0.25
MAX_BACKOFF_S = 2.0


class MoveToPool(Exception):
    """Raised by run_node after a clean shutdown (not an error): the process must come back as a node of `role`."""

    def __init__(self, role: Role) -> None:
        super().__init__(f"move to the {role} pool")
        self.role = role


class ControlWatcher:
    """Applies one node's control as it changes; see the module docstring."""

    def __init__(
        self,
        read_control: Callable[[], NodeControl | None],
        set_draining: Callable[[bool], Awaitable[None]],
        *,
        role: Role,
        node_id: str,
        say: Callable[[dict[str, object]], None],
        poll_s: float = POLL_S,
    ) -> None:
        self._read_control = read_control  # blocking (Redis); run on a worker thread
        self._set_draining = set_draining
        self._role, self._node_id = role, node_id
        self._say = say
        self._poll_s = poll_s
        self._drained = False
        self._failing = False
        self._backoff_s = poll_s

    async def wait_for_move(self) -> Role:
        """Applies drain/resume as they come, until the control asks for another pool; returns that role."""
        while True:
            control = await self._poll()
            pool = control.pool if control is not None else None
            if pool is not None and pool != self._role:
                return pool
            if control is not None or not self._failing:  # an unreadable control changes nothing
                await self._apply_drain(control is not None and control.drain)
            await asyncio.sleep(self._backoff_s if self._failing else self._poll_s)

    async def _poll(self) -> NodeControl | None:
        try:
            control = await asyncio.to_thread(self._read_control)
        except Exception as exc:  # Redis down, a bad record: keep serving as we are, and try again
            if not self._failing:
                logger.warning("cannot read node control (retrying, backing off): %r", exc)
                self._backoff_s = self._poll_s
            else:
                self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            self._failing = True
            return None
        if self._failing:
            logger.info("reading node control works again")
        self._failing = False
        return control

    async def _apply_drain(self, drain: bool) -> None:
        if drain == self._drained:
            return
        await self._set_draining(drain)
        self._drained = drain
        self._say({"event": "draining" if drain else "resumed", "node_id": self._node_id})


async def serve_until_stop_or_move(stop: asyncio.Event, watcher: ControlWatcher) -> Role | None:
    """Waits for a stop signal (None) or a move the control asks for (the new role), whichever comes first."""
    moved = asyncio.create_task(watcher.wait_for_move())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({moved, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (moved, stopped):
        task.cancel()
    await asyncio.gather(moved, stopped, return_exceptions=True)
    if stop.is_set() or moved.cancelled():
        return None
    return moved.result()


def exec_in_role(role: Role, node_flags: Sequence[str]) -> NoReturn:
    """Replaces this process by `python -m ops.cli <role> <node_flags>`: same pid, same stdout, same environment."""
    sys.stdout.flush()
    sys.stderr.flush()
    # `-m ops.cli` rather than argv[0]: it works whether this process began as `splitserve` or `python -m ops.cli`.
    os.execv(sys.executable, [sys.executable, "-m", "ops.cli", role, *node_flags])
