"""The foreground of `splitserve up`: start a LocalCluster, print where it serves, supervise it until Ctrl-C.

1. Start Redis, the nodes and the routers (ops/launcher.py) and print one line per part (a part that does not start
   is a UserError: `splitserve up: error: prefill did not start: <its own reason>`, and nothing is left
   running): Redis (its URL redacted: the embedded one has a password), each node (id, gRPC and metrics
   addresses), the routers' endpoints.
2. Twice a second: print what the parts report (a node drained, resumed, moving to another pool, ready again after
   a restart), and let the Supervisor (ops/supervisor.py) restart whatever died, one line per restart.
3. On SIGINT or SIGTERM, and only then, stop everything (routers first) and print `stopped`.
"""

from __future__ import annotations

import signal
import threading

from cluster.redis_server import RedisServerError, RedisServerNotFound, redacted
from ops.cli_errors import UserError
from ops.launcher import ChildStartError, ClusterSpec, LocalCluster, Process
from ops.supervisor import Supervisor

TICK_S = 0.5


def run_foreground(spec: ClusterSpec, model_name: str) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(spec)
    try:
        cluster.start()  # stops what it started when a part fails
    except (ChildStartError, RedisServerNotFound, RedisServerError) as exc:
        if stop.is_set():  # Ctrl-C while starting: the parts it reached died of it, which is no error
            return 130
        where = "" if isinstance(exc, ChildStartError) else "the embedded Redis did not start: "
        raise UserError(f"{where}{exc}") from None
    try:
        _say(f"splitserve: Redis at {redacted(cluster.redis_url)}")
        for proc in cluster.processes:
            _say(_process_line(proc))
        _say(f"splitserve: OpenAI-compatible HTTP on http://{cluster.http_address}/v1")
        _say(f"splitserve: ops dashboard on http://{cluster.http_address}/dashboard")
        _say(f"splitserve: serving {model_name} on grpc://{cluster.router_address} (Ctrl-C stops)")
        supervisor = Supervisor(cluster, _say)
        while not stop.wait(TICK_S):
            for proc, event in cluster.poll_events():
                _report_event(proc, event)
            if not stop.is_set():  # a Ctrl-C also reaches the children: what it stops is not restarted
                supervisor.tick()
    finally:
        cluster.stop()
    _say("splitserve: stopped")
    return 0


def _process_line(proc: Process) -> str:
    if proc.role == "router":
        return f"splitserve: {'router':<9} grpc://{proc.address}  http://{proc.ready.get('http_address', '')}"
    metrics = f"  metrics http://{proc.metrics_address}/metrics"
    return f"splitserve: {proc.role:<9} {proc.node_id:<40} {proc.address}{metrics}"


def _report_event(proc: Process, event: dict[str, object]) -> None:
    """What happened to a part as it happens: an operator's drain, resume or move, a part ready (again)."""
    kind, node_id = event.get("event"), event.get("node_id", "")
    if kind in ("draining", "resumed"):
        _say(f"splitserve: {node_id} {kind}")
    elif kind == "moving":
        _say(f"splitserve: {node_id} is moving to the {event.get('to')} pool")
    elif kind == "ready":
        _say(_process_line(proc))


def _say(line: str) -> None:
    print(line, flush=True)
