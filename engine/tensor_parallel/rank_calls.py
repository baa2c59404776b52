"""Calls from rank 0 to an object living in a worker rank's process: the worker ranks' share of a node's KV transfer.

The engine runs the model on every rank, but what else a rank does with its KV pool belongs to the layer above
(cluster/node/rank_kv.py: each rank writing its KV heads straight into the peer rank that owns them, through a
transport of its own). The engine cannot import that code, so it loads it by name: EngineConfig.rank_extension (a
RankExtension, engine/config.py) names a factory that each worker calls once its pool exists,
`factory(rank, kv_caches, **options)`. The object it returns:
- answers rank 0's calls, `call(method, *args)` on rank 0's RankChannel runs `getattr(obj, method)(*args)` in the
  worker, on a thread of its own (one call at a time per worker; replies carry the result or the error's text);
- runs inside every step that carries a layer plan: `obj.on_layer_stored(layer, plan)` right after each layer's KV
  of the step is in the rank's pool (StepInputs.layer_plan: rank 0 makes it, every rank gets it with the step);
- is closed, `obj.close()`, when rank 0 stops the worker.
Every call has a deadline: a worker that is gone or stuck makes the call raise RankCallFailed, never hang.
"""

from __future__ import annotations

import threading
from typing import Any

DEFAULT_CALL_TIMEOUT_S = 10.0


class RankCallFailed(RuntimeError):
    """A call to a worker rank's extension did not complete: the rank is gone, stuck, or the method raised."""


class RankChannel:
    """Rank 0's end of one worker's call pipe (multiprocessing Connection); thread-safe, one call at a time."""

    def __init__(self, rank: int, connection: Any) -> None:
        self.rank = rank
        self._connection = connection
        self._lock = threading.Lock()
        self._broken: str | None = None

    def call(self, method: str, *args: Any, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> Any:
        """The worker's `obj.method(*args)`; RankCallFailed if it raised, the rank is gone, or no reply came."""
        with self._lock:
            if self._broken is not None:
                raise RankCallFailed(f"rank {self.rank}: {self._broken}")
            try:
                self._connection.send((method, args))
                if not self._connection.poll(timeout_s):
                    # A late reply would answer the next call: this channel is done.
                    self._broken = f"no reply to {method} within {timeout_s:.1f} s"
                    raise RankCallFailed(f"rank {self.rank}: {self._broken}")
                ok, value = self._connection.recv()
            except (OSError, EOFError) as exc:
                self._broken = f"its call pipe broke ({type(exc).__name__})"
                raise RankCallFailed(f"rank {self.rank}: {self._broken}") from exc
        if not ok:
            raise RankCallFailed(f"rank {self.rank}: {method} failed: {value}")
        return value

    def close(self) -> None:
        self._broken = self._broken or "closed"
        self._connection.close()


def serve_calls(connection: Any, target: Any, rank: int) -> threading.Thread:
    """Worker side: answer rank 0's calls on `target` until the pipe closes (a daemon thread)."""

    def serve() -> None:
        while True:
            try:
                method, args = connection.recv()
            except (OSError, EOFError):
                return  # rank 0 is gone or closed the pipe; the worker's parent watch ends the process
            try:
                reply = (True, getattr(target, method)(*args))
            except Exception as exc:  # the reply names it; rank 0 decides what a failed call means
                reply = (False, f"{type(exc).__name__}: {exc}")
            try:
                connection.send(reply)
            except (OSError, EOFError):
                return

    thread = threading.Thread(target=serve, name=f"tp-rank{rank}-calls", daemon=True)
    thread.start()
    return thread
