"""`splitserve up`: a whole local cluster as separate OS processes (and the same launcher for integration tests).

Order: Redis (embedded unless a URL is given) -> nodes -> routers, each waited for through its ready line on stdout
(bounded). Stop: SIGTERM to routers, then nodes (they drain), a bounded wait, SIGKILL to anything left, then Redis.
`respawn` starts a process that died again with the same flags (ops/supervisor.py decides when).

Secrets reach the children through their environment, never argv (which `ps` shows to every user): the cluster
token (`SPLITSERVE_CLUSTER_TOKEN`, generated unless the spec has one: nodes then refuse calls without it), the
Redis URL (`SPLITSERVE_REDIS_URL`) and the routers' API key (`SPLITSERVE_API_KEY`). The embedded Redis has a password, carried by `redis_url`: print
`redacted(url)` (cluster/redis_server.py), never the URL itself.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cluster.auth import TOKEN_ENV, generate_token
from cluster.redis_server import EmbeddedRedis

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


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


@dataclass(slots=True)
class Process:
    role: str
    popen: subprocess.Popen[str]
    ready: dict[str, object]
    lines: queue.SimpleQueue[str | None]
    args: list[str] = field(default_factory=list)  # the flags after the role word, to start it again with
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
                self.redis = EmbeddedRedis()
                self.redis.start()
                self.redis_url = self.redis.url
            roles = (
                ["prefill"] * self.spec.prefill
                + ["decode"] * self.spec.decode
                + ["colocated"] * self.spec.colocated
            )
            pending = [self._spawn(role, self._node_args(role)) for role in roles]
            for proc in pending:
                self._await_ready(proc)
            for i in range(self.spec.routers):
                ports = (self.spec.grpc_port, self.spec.http_port) if i == 0 else (0, 0)
                self._await_ready(self._spawn("router", self._router_args(*ports)))
        except BaseException:
            self.stop()
            raise
        return self

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

    def _node_args(self, role: str) -> list[str]:
        return [
            "--model", str(self.spec.model_dir), "--host", self.spec.host, "--port", "0",
            "--kv-backend", self.spec.kv_backend, "--threads", str(self.spec.threads_per_node),
            *self.spec.node_args, *self.spec.role_args.get(role, []),
        ]  # fmt: skip

    def _router_args(self, grpc_port: int, http_port: int) -> list[str]:
        return [
            "--model", str(self.spec.model_dir), "--host", self.spec.host,
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), *self.spec.router_args,
        ]  # fmt: skip

    @property
    def http_address(self) -> str:
        return str(self.by_role("router")[0].ready["http_address"])

    def _spawn(self, role: str, args: list[str]) -> Process:
        popen, lines = self._popen(role, args)
        proc = Process(role, popen, {}, lines, args)
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
        proc.popen, proc.lines = self._popen(proc.role, args)
        proc.args = args
        proc.started_at = time.monotonic()

    def _popen(
        self, role: str, args: list[str]
    ) -> tuple[subprocess.Popen[str], queue.SimpleQueue[str | None]]:
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
            [sys.executable, "-m", "ops.cli", role, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        assert popen.stdout is not None  # stdout=PIPE above
        threading.Thread(target=_pump, args=(popen.stdout, lines), daemon=True).start()
        return popen, lines

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
                    code = proc.popen.returncode
                    raise RuntimeError(f"{proc.role} exited with code {code} before it was ready") from None
                continue
            if line is None:
                raise RuntimeError(
                    f"{proc.role} closed its output before it was ready (exit {proc.popen.wait(5)})"
                )
            event = _event(line)
            if event.get("event") == "ready":
                proc.ready = event
                return
        raise TimeoutError(f"{proc.role} was not ready within {READY_TIMEOUT_S:.0f} s")


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
