"""`splitserve up`: a whole local cluster as separate OS processes (and the same launcher for integration tests).

Order: Redis (embedded unless a URL is given) -> nodes -> routers, each waited for through its ready line on stdout
(bounded). A child's stderr is held until it is ready, then passed through to ours: one that exits first raises
ChildStartError with the child's own last line (its one-line reason, e.g. a port in use), not its whole log.
Stop: SIGTERM to routers, then nodes (they drain), a bounded wait, SIGKILL to anything left, then Redis.
`respawn` starts a process that died again with the same flags (ops/supervisor.py decides when).

Secrets reach the children through their environment, never argv (which `ps` shows to every user): the cluster
token (`SPLITSERVE_CLUSTER_TOKEN`, generated unless the spec has one: nodes then refuse calls without it), the
Redis URL (`SPLITSERVE_REDIS_URL`) and the routers' API key (`SPLITSERVE_API_KEY`). The embedded Redis has a
password, carried by `redis_url`: print `redacted(url)` (cluster/redis_server.py), never the URL itself.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cluster.auth import TOKEN_ENV, generate_token
from cluster.redis_server import EmbeddedRedis

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
HELD_STDERR_LINES = 200  # what a starting child may print before its ready line; older lines are dropped
# How a child's error line begins (ops/cli.py): stripped from the reason `up` repeats.
_CHILD_ERROR_PREFIX = re.compile(r"^splitserve [\w-]+: error: ")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one process of a cluster runs: the address it listens on and advertises, and a command its own runs
    under (e.g. `ip netns exec NS`: a test's "host" in a network namespace). Hosts other than the spec's loopback
    need a Redis they can reach: ClusterSpec.redis_host, or redis_url."""

    host: str
    prefix: tuple[str, ...] = ()
    advertise_host: str | None = None  # what it publishes, when it listens on a wildcard host


# (role, index among that role's processes) -> where it runs; None: the spec's host, no prefix.
PlaceProcess = Callable[[str, int], Placement]


class ChildStartError(RuntimeError):
    """A process of the cluster exited, or did not get ready, before its ready line; the text is one line."""


@dataclass(slots=True)
class ClusterSpec:
    model_dir: Path
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    routers: int = 1
    redis_url: str | None = None
    kv_backend: str = "torch"
    grpc_port: int = 50051  # the first router's port; further routers take any free port
    http_port: int = 8000  # likewise, for the OpenAI-compatible HTTP endpoint
    api_key: str | None = None
    cluster_token: str | None = None  # None: a fresh random one
    host: str = "127.0.0.1"
    threads_per_node: int = 1
    node_args: list[str] = field(default_factory=list)  # extra flags for every node (e.g. --kv-cache-mb 64)
    # Extra flags for the nodes of one role, after node_args (e.g. {"decode": ["--machine-type", "dgx-a100"]}).
    role_args: dict[str, list[str]] = field(default_factory=dict)
    router_args: list[str] = field(default_factory=list)  # extra flags for every router (e.g. --policy cost)
    place: PlaceProcess | None = None  # where each node and router runs (default: host, as a plain child)
    redis_host: str = "127.0.0.1"  # where the embedded Redis listens


@dataclass(slots=True)
class Process:
    role: str
    popen: subprocess.Popen[str]
    ready: dict[str, object]
    lines: queue.SimpleQueue[str | None]
    stderr: StderrRelay
    args: list[str] = field(default_factory=list)  # the flags after the role word, to start it again with
    prefix: tuple[str, ...] = ()  # what its command runs under (Placement.prefix)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> str:
        return str(self.ready.get("address", ""))

    @property
    def metrics_address(self) -> str:
        """host:port serving this process's Prometheus GET /metrics (a router's is its HTTP address)."""
        return str(self.ready.get("metrics_address") or self.ready.get("http_address", ""))

    @property
    def node_id(self) -> str:
        return str(self.ready.get("node_id", ""))


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.redis: EmbeddedRedis | None = None
        self.redis_url = spec.redis_url or ""
        self.processes: list[Process] = []
        self.cluster_token = spec.cluster_token or generate_token()

    def start(self) -> LocalCluster:
        try:
            if not self.redis_url:
                self.redis = EmbeddedRedis(host=self.spec.redis_host)
                self.redis.start()
                self.redis_url = self.redis.url
            roles = (
                ["prefill"] * self.spec.prefill
                + ["decode"] * self.spec.decode
                + ["colocated"] * self.spec.colocated
            )
            pending = [self._spawn_node(role, roles[:i].count(role)) for i, role in enumerate(roles)]
            for proc in pending:
                self._await_ready(proc)
            for i in range(self.spec.routers):
                ports = (self.spec.grpc_port, self.spec.http_port) if i == 0 else (0, 0)
                place = self._placement("router", i)
                self._await_ready(self._spawn("router", self._router_args(place, *ports), place))
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, role: str, extra_args: Sequence[str] = (), wait: bool = False) -> Process:
        """One more node of `role` in the running cluster, placed as the spec says, with extra_args after the
        spec's; its ready line is waited for with `wait` (else poll_events)."""
        index = len(self.by_role(role))
        place = self._placement(role, index)
        proc = self._spawn(role, [*self._node_args(role, place), *extra_args], place)
        if wait:
            self._await_ready(proc)
        return proc

    def by_role(self, role: str) -> list[Process]:
        return [p for p in self.processes if p.role == role]

    @property
    def router_address(self) -> str:
        return self.by_role("router")[0].address

    def stop(self) -> None:
        for group in ("router", None):  # routers first, so nothing new reaches the nodes while they drain
            for proc in self.processes:
                if (proc.role == "router") == (group == "router") and proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self.processes:
                if (proc.role == "router") == (group == "router"):
                    _wait_or_kill(proc.popen, deadline)
        for proc in self.processes:
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals ------------------------------------------------------------------------------------------------

    def _placement(self, role: str, index: int) -> Placement:
        return Placement(self.spec.host) if self.spec.place is None else self.spec.place(role, index)

    def _node_args(self, role: str, place: Placement) -> list[str]:
        return [
            "--model", str(self.spec.model_dir), *_host_args(place), "--port", "0",
            "--kv-backend", self.spec.kv_backend, "--threads", str(self.spec.threads_per_node),
            *self.spec.node_args, *self.spec.role_args.get(role, []),
        ]  # fmt: skip

    def _router_args(self, place: Placement, grpc_port: int, http_port: int) -> list[str]:
        return [
            "--model", str(self.spec.model_dir), *_host_args(place),
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), *self.spec.router_args,
        ]  # fmt: skip

    @property
    def http_address(self) -> str:
        return str(self.by_role("router")[0].ready["http_address"])

    def _spawn_node(self, role: str, index: int) -> Process:
        place = self._placement(role, index)
        return self._spawn(role, self._node_args(role, place), place)

    def _spawn(self, role: str, args: list[str], place: Placement) -> Process:
        popen, lines, stderr = self._popen(role, args, place.prefix)
        proc = Process(role, popen, {}, lines, stderr, args, place.prefix)
        self.processes.append(proc)
        return proc

    def respawn(self, proc: Process) -> None:
        """Starts `proc`, which has exited, again in its (current) role with the same flags, without waiting for
        it: its new ready line comes through `poll_events`. A router keeps the ports it had, so the addresses
        clients hold stay valid."""
        if proc.popen.poll() is None:
            raise RuntimeError(f"{proc.role} (pid {proc.popen.pid}) is still running")
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        args = proc.args
        if proc.role == "router" and proc.ready:
            args = _with_ports(args, proc.address, str(proc.ready.get("http_address", "")))
        proc.popen, proc.lines, proc.stderr = self._popen(proc.role, args, proc.prefix)
        proc.args = args
        proc.started_at = time.monotonic()

    def _popen(
        self, role: str, args: list[str], prefix: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[str], queue.SimpleQueue[str | None], StderrRelay]:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.spec.threads_per_node),
            "PYTHONUNBUFFERED": "1",
            TOKEN_ENV: self.cluster_token,
            "SPLITSERVE_REDIS_URL": self.redis_url,  # it may carry a password: not in argv
        }
        if role == "router" and self.spec.api_key:
            env["SPLITSERVE_API_KEY"] = self.spec.api_key
        popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ops.cli", role, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        assert popen.stdout is not None and popen.stderr is not None  # PIPE above
        threading.Thread(target=_pump, args=(popen.stdout, lines), daemon=True).start()
        return popen, lines, StderrRelay(popen.stderr)

    def poll_events(self) -> list[tuple[Process, dict[str, object]]]:
        """The JSON events the processes printed since the last call, without waiting. A node's new `ready` line
        (it moved to another pool: same process, new role) updates its Process."""
        events = []
        for proc in self.processes:
            while True:
                try:
                    line = proc.lines.get_nowait()
                except queue.Empty:
                    break
                if line is None:  # the process closed its output: keep the marker for whoever waits on it
                    proc.lines.put(None)
                    break
                event = _event(line)
                if event.get("event") == "ready":
                    proc.ready = event
                    proc.role = str(event.get("role", proc.role))
                    proc.stderr.release()
                if event:
                    events.append((proc, event))
        return events

    def _await_ready(self, proc: Process) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = proc.lines.get(timeout=0.2)
            except queue.Empty:
                if proc.popen.poll() is not None:
                    raise ChildStartError(_start_failure(proc)) from None
                continue
            if line is None:
                raise ChildStartError(_start_failure(proc))
            event = _event(line)
            if event.get("event") == "ready":
                proc.ready = event
                proc.stderr.release()
                return
        proc.stderr.release()  # still starting: what it said so far helps to see why
        raise ChildStartError(f"{proc.role} was not ready within {READY_TIMEOUT_S:.0f} s")


def _host_args(place: Placement) -> list[str]:
    advertise = ["--advertise-host", place.advertise_host] if place.advertise_host else []
    return ["--host", place.host, *advertise]


class StderrRelay:
    """A child's stderr, read on a thread: held while the child starts, passed through to ours once `release`d.
    `last_line` is its last non-blank line so far: the reason a child that failed gave for it."""

    def __init__(self, stream: IO[str]) -> None:
        self._lock = threading.Lock()
        self._held: list[str] | None = []  # None: released
        self.last_line = ""
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
            for line in held:
                _write_stderr(line)

    def wait_closed(self, timeout_s: float) -> None:
        """Until the child's stderr reached its end (it exited), at most `timeout_s`."""
        self._thread.join(timeout_s)

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                with self._lock:
                    if line.strip():
                        self.last_line = line.strip()
                    if self._held is None:
                        _write_stderr(line)
                    else:
                        self._held.append(line)
                        del self._held[:-HELD_STDERR_LINES]


def _write_stderr(line: str) -> None:
    # sys.__stderr__: a test's captured sys.stderr may be closed by the time a child writes; a failed write must not
    # stop the pump, or a child blocks on a full pipe.
    try:
        if sys.__stderr__ is not None:
            sys.__stderr__.write(line)
            sys.__stderr__.flush()
    except (OSError, ValueError):
        pass


def _start_failure(proc: Process) -> str:
    """One line: which process did not start, and the reason it gave (its last line on stderr)."""
    try:
        code: int | None = proc.popen.wait(5)
    except subprocess.TimeoutExpired:  # it closed its output but runs on
        code = None
    proc.stderr.wait_closed(5.0)
    reason = error_reason(proc.stderr.last_line) or proc.stderr.last_line  # a crash: its exception's line
    if reason:
        return f"{proc.role} did not start: {reason}"
    return f"{proc.role} did not start (exit code {code}) and gave no reason on stderr"


def error_reason(line: str) -> str:
    """The message of a child's one-line error (`splitserve ROLE: error: MESSAGE`), or "" for any other line."""
    match = _CHILD_ERROR_PREFIX.match(line)
    return line[match.end() :] if match else ""


def _pump(stream: IO[str], lines: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _with_ports(args: list[str], grpc_address: str, http_address: str) -> list[str]:
    """A router's flags with the ports it actually had (it may have been started with port 0)."""
    ports = {"--grpc-port": grpc_address.rpartition(":")[2], "--http-port": http_address.rpartition(":")[2]}
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in ports and ports[word].isdigit():
            out[i + 1] = ports[word]
    return out


def _event(line: str) -> dict[str, object]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def _wait_or_kill(popen: subprocess.Popen[str], deadline: float) -> None:
    try:
        popen.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(5)
