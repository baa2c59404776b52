"""Supervision for `splitserve up`: whatever dies (a node, a router, the embedded Redis) is started again.

The life of one supervised part:
1. It runs. `Supervisor.tick()` (called by `up` twice a second) notices when it has exited.
2. Its restart is due after a back-off (0.5 s, doubling to 10 s; back to 0.5 s once it had stayed up 30 s), so
   a part that cannot start does not spin. Meanwhile the rest of the cluster keeps serving: routers place requests
   on the nodes still alive, and keep their last view of the cluster while Redis is down.
3. When due, it is started again with the same flags and environment, and one line says so (with the error line
   the part printed last, if any: why it died, e.g. its port taken). A node comes back under
   a new id and registers itself (routers see it at once); a router comes back on the same gRPC and HTTP ports, and
   the embedded Redis on the same port with the same password, so that the addresses others hold stay valid. An
   empty, restarted Redis fills again as each node's next heartbeat finds its key gone and registers it again.
4. Only Ctrl-C or SIGTERM stops the cluster (LocalCluster.stop), never a part that died.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.redis_server import RedisServerError
from ops.launcher import LocalCluster, Process, error_reason


@dataclass(slots=True)
class Backoff:
    """Delays between restarts of one part: `initial_s` doubling up to `max_s`, reset after `stable_s` of uptime."""

    initial_s: float = 0.5
    max_s: float = 10.0
    stable_s: float = 30.0
    _next_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self._next_s = self.initial_s

    def delay_after(self, uptime_s: float) -> float:
        """The wait before the next start of a part that ran `uptime_s` before it ended."""
        if uptime_s >= self.stable_s:
            self._next_s = self.initial_s
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay


@dataclass(slots=True)
class _Pending:
    due: float  # monotonic time the restart is due
    delay_s: float
    exit_code: int | None


class Supervisor:
    """Restarts the parts of a started LocalCluster that died; see the module docstring."""

    def __init__(
        self,
        cluster: LocalCluster,
        say: Callable[[str], None],
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cluster = cluster
        self._say = say
        self._new_backoff = backoff
        self._clock = clock
        self._backoffs: dict[int, Backoff] = {}  # by id(Process); the key "redis" below is -1
        self._pending: dict[int, _Pending] = {}
        self._redis_started = clock()
        self.restarts = 0

    def tick(self) -> None:
        """Notices what died, and restarts what is due. Never raises for a part that fails to start again."""
        self._tick_redis()
        for proc in list(self._cluster.processes):
            self._tick_process(proc)

    def _tick_process(self, proc: Process) -> None:
        key = id(proc)
        code = proc.popen.poll()
        if code is None:
            return
        pending = self._pending.get(key)
        now = self._clock()
        if pending is None:
            delay = self._backoff(key).delay_after(now - proc.started_at)
            self._pending[key] = _Pending(now + delay, delay, code)
            return
        if now < pending.due:
            return
        del self._pending[key]
        why = error_reason(proc.stderr.last_line)  # read before respawn replaces its stderr
        self._cluster.respawn(proc)
        self.restarts += 1
        name = f"{proc.role} {proc.node_id}".strip()
        self._say(
            f"splitserve: {name} exited with code {pending.exit_code}; restarted it after {pending.delay_s:.1f} s"
            + (f" (it said: {why})" if why else "")
        )

    def _tick_redis(self) -> None:
        redis = self._cluster.redis
        if redis is None:
            return
        now = self._clock()
        pending = self._pending.get(-1)
        if pending is None:
            code = redis.exited()
            if code is None:
                return
            delay = self._backoff(-1).delay_after(now - self._redis_started)
            self._pending[-1] = _Pending(now + delay, delay, code)
            return
        if now < pending.due:
            return
        del self._pending[-1]
        try:
            redis.restart()
        except RedisServerError as exc:  # its port taken meanwhile, say: try again after the next back-off
            delay = self._backoff(-1).delay_after(0.0)
            self._pending[-1] = _Pending(now + delay, delay, pending.exit_code)
            self._say(f"splitserve: Redis did not start again ({exc}); retrying in {delay:.1f} s")
            return
        self._redis_started = self._clock()
        self.restarts += 1
        self._say(
            f"splitserve: Redis exited with code {pending.exit_code}; restarted it on the same port "
            f"after {pending.delay_s:.1f} s"
        )

    def _backoff(self, key: int) -> Backoff:
        if key not in self._backoffs:
            self._backoffs[key] = self._new_backoff()
        return self._backoffs[key]
