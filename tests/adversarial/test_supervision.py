"""`splitserve up` under kill -9: whatever dies comes back within 10 s while the cluster keeps serving.

One `up` process (1 prefill + 1 decode node, a router, the embedded Redis, an API key) runs as a subprocess in its own
process group; the test reads its printed lines, kills its children with SIGKILL one kind at a time, and keeps
sending requests: each must succeed, retried within a short window while the only node of a kind restarts, with
the same greedy text every time. Redis killed: a request sent during the outage is served from the router's last
view, and both nodes register again once the supervisor restarted Redis. Finally SIGINT stops everything.

Without a supervisor (LocalCluster), /readyz is checked against the truth: a drained node, a long Redis outage (while
requests are still served from the last view), a dead node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis

from cluster.redis_server import EmbeddedRedis
from cluster.state import (
    INDEX_KEY,
    LoadPublisher,
    LoadReport,
    NodeControl,
    NodeInfo,
    NodeRegistration,
    clear_control,
    node_key,
    write_control,
)
from ops.launcher import ClusterSpec, LocalCluster
from ops.supervisor import Backoff

pytestmark = pytest.mark.timeout(300)
API_KEY = "sk-supervision-test"
BACK_WITHIN_S = 10.0  # the bound: a dead part is back within 10 s
RETRY_WINDOW_S = 20.0  # a request may be retried this long while the only node of its kind restarts
START_TIMEOUT_S = 150.0
MODEL = "llama"  # the name of the llama_dir fixture's directory, which the router serves under


@dataclass
class Up:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    http: str = ""

    def wait_line(self, pattern: str, start: int, timeout_s: float) -> int:
        """The index of the first line from `start` on matching `pattern`; fails the test after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i in range(start, len(self.lines)):
                if re.search(pattern, self.lines[i]):
                    return i
            assert self.popen.poll() is None, f"up exited with {self.popen.returncode}: {self.lines[-5:]}"
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s: {self.lines[start:]}")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.popen.pid).children(recursive=True)

    def child(self, role: str) -> psutil.Process:
        for proc in self.children():
            cmdline = proc.cmdline()
            if (role == "redis" and "redis-server" in " ".join(cmdline[:1])) or role in cmdline[:4]:
                return proc
        raise AssertionError(f"no {role} process under up")

    def redis_client(self) -> redis.Redis:
        # The password is in the nodes' environment (never in argv or up's output): read it as the same user may.
        url = self.child("decode").environ()["SPLITSERVE_REDIS_URL"]
        return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


def _pump(popen: subprocess.Popen[str], lines: list[str]) -> None:
    assert popen.stdout is not None
    for line in popen.stdout:
        lines.append(line.rstrip("\n"))


@pytest.fixture(scope="module")
def up(llama_dir: Path) -> Iterator[Up]:
    assert llama_dir.name == MODEL
    popen = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--model", str(llama_dir), "--prefill", "1", "--decode", "1",
         "--grpc-port", "0", "--http-port", "0", "--api-key", API_KEY],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )  # fmt: skip
    running = Up(popen)
    threading.Thread(target=_pump, args=(popen, running.lines), daemon=True).start()
    try:
        served = running.wait_line(r"OpenAI-compatible HTTP on http://", 0, START_TIMEOUT_S)
        running.http = running.lines[served].split("http://", 1)[1].removesuffix("/v1")
        running.wait_line(r"\(Ctrl-C stops\)", 0, 10)
        yield running
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(10)
        _kill_group_leftovers(popen.pid)


def _kill_group_leftovers(pgid: int) -> None:
    with contextlib.suppress(
        ProcessLookupError
    ):  # anything of the up session still around (should be nothing)
        os.killpg(pgid, signal.SIGKILL)


def complete(http: str, timeout_s: float = 10.0) -> str:
    body = json.dumps(
        {"model": MODEL, "prompt": "The cluster", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    )
    request = urllib.request.Request(
        f"http://{http}/v1/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return str(json.load(reply)["choices"][0]["text"])


def complete_with_retries(http: str, window_s: float = RETRY_WINDOW_S) -> str | None:
    """The text, retrying failures for at most `window_s`; None if every try within it failed."""
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        try:
            return complete(http)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.2)
    return None


class Traffic:
    """Requests one after another on a thread, each retried within RETRY_WINDOW_S, until stopped."""

    def __init__(self, http: str) -> None:
        self.http = http
        self.texts: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.texts.append(complete_with_retries(self.http))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(RETRY_WINDOW_S + 15)


@pytest.fixture(scope="module")
def baseline(up: Up) -> str:
    return complete(up.http, timeout_s=60)


def test_no_secret_in_printed_lines_or_argv(up: Up) -> None:
    assert any("Redis at redis://***@127.0.0.1:" in line for line in up.lines)
    password = up.redis_client().connection_pool.connection_kwargs["password"]
    token = up.child("decode").environ()["SPLITSERVE_CLUSTER_TOKEN"]
    assert password and token
    for line in up.lines:
        assert password not in line and token not in line and API_KEY not in line
    for proc in up.children():
        argv = " ".join(proc.cmdline())
        assert password not in argv and token not in argv and API_KEY not in argv, argv


@pytest.mark.parametrize("role", ["decode", "prefill", "router"])
def test_a_killed_part_is_back_within_10_s_and_requests_keep_succeeding(
    up: Up, baseline: str, role: str
) -> None:
    with Traffic(up.http) as traffic:
        while len(traffic.texts) < 2:
            time.sleep(0.05)
        start = len(up.lines)
        victim = up.child(role)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        restarted = up.wait_line(
            rf"splitserve: {role} .*exited with code -9; restarted it", start, BACK_WITHIN_S
        )
        up.wait_line(rf"^splitserve: {role}\s", restarted + 1, BACK_WITHIN_S - (time.monotonic() - killed_at))
        back_at = time.monotonic()
        assert back_at - killed_at <= BACK_WITHIN_S
        served_before = len(traffic.texts)
        deadline = time.monotonic() + RETRY_WINDOW_S + 15
        while len(traffic.texts) < served_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert up.child(role).pid != victim.pid
    assert len(traffic.texts) >= served_before + 2
    assert traffic.texts == [baseline] * len(traffic.texts)  # none failed (None), same greedy text


def test_redis_killed_the_router_serves_from_its_view_and_nodes_register_again(up: Up, baseline: str) -> None:
    client = up.redis_client()
    assert client.hlen(INDEX_KEY) == 2
    start = len(up.lines)
    up.child("redis").send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    during_outage = complete(up.http)  # no retry: the router places it from its last view
    assert not any("Redis exited" in line for line in up.lines[start:]), "Redis came back before the request"
    assert during_outage == baseline
    up.wait_line(
        r"splitserve: Redis exited with code -9; restarted it on the same port", start, BACK_WITHIN_S
    )
    nodes = {up.child("prefill").pid, up.child("decode").pid}

    def registered() -> int:
        try:
            ids = [i.decode() for i in client.hkeys(INDEX_KEY)]
            return sum(1 for i in ids if client.exists(node_key(i)))
        except redis.RedisError:
            return 0

    while registered() < 2 and time.monotonic() - killed_at < BACK_WITHIN_S:
        time.sleep(0.1)
    assert registered() == 2, "the nodes did not register again in the restarted Redis"
    assert {up.child("prefill").pid, up.child("decode").pid} == nodes  # the nodes rode it out, no restart
    wait_readyz(up.http, 200, 5)  # the router sees them again (their load reports follow the registration)
    assert complete(up.http) == baseline


def test_sigint_stops_every_child(up: Up) -> None:
    children = up.children()
    assert len(children) == 4  # Redis, prefill, decode, router
    up.popen.send_signal(signal.SIGINT)
    assert up.popen.wait(60) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert up.lines[-1] == "splitserve: stopped"
    with pytest.raises(ProcessLookupError):
        os.killpg(up.popen.pid, 0)  # nothing is left in up's process group


def readyz(http: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://{http}/readyz", timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def wait_readyz(http: str, status: int, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = readyz(http)
        if code == status or time.monotonic() > deadline:
            assert code == status, body
            return body
        time.sleep(0.1)


def test_readyz_tells_the_truth_and_the_router_serves_through_a_redis_outage(llama_dir: Path) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, api_key=API_KEY)
    with LocalCluster(spec) as cluster:
        assert cluster.redis is not None and cluster.redis.pid is not None
        http = cluster.http_address
        baseline = complete(http, timeout_s=60)
        wait_readyz(http, 200, 5)
        client = redis.Redis.from_url(cluster.redis_url)
        [decode] = cluster.by_role("decode")
        write_control(client, decode.node_id, NodeControl(drain=True))
        assert "no usable prefill path" in str(wait_readyz(http, 503, 5)["reason"])
        clear_control(client, decode.node_id)
        wait_readyz(http, 200, 5)

        os.kill(cluster.redis.pid, signal.SIGKILL)  # nobody restarts it: a long outage
        body = wait_readyz(http, 503, 10)
        assert "no contact with Redis" in str(body["reason"])
        assert complete(http) == baseline  # still served, from the router's last view

        cluster.redis.restart()  # same port, same password: the URLs everybody holds work again
        restarted_at = time.monotonic()
        wait_readyz(http, 200, 10)  # only once both nodes registered again: kept nodes are not counted usable
        client = redis.Redis.from_url(cluster.redis_url)
        ids = [i.decode() for i in client.hkeys(INDEX_KEY)]
        assert time.monotonic() - restarted_at < BACK_WITHIN_S
        assert sorted(ids) == sorted(
            p.node_id for p in cluster.by_role("prefill") + cluster.by_role("decode")
        )
        assert complete(http) == baseline

        decode.popen.send_signal(signal.SIGKILL)  # Redis is up: the dead node's lease lapses and it leaves
        assert "decode 0/0" in str(wait_readyz(http, 503, 10)["reason"])


def test_restart_back_off_doubles_to_10_s_and_resets_after_a_stable_run() -> None:
    backoff = Backoff()
    assert [backoff.delay_after(1.0) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay_after(backoff.stable_s) == 0.5  # it had stayed up: a fresh failure starts over
    assert backoff.delay_after(1.0) == 1.0


class CountingRegistration(NodeRegistration):
    """A real registration that counts its heartbeat attempts."""

    attempts = 0

    def heartbeat(self) -> bool:
        self.attempts += 1
        return super().heartbeat()


def test_a_node_backs_off_while_redis_is_gone_and_registers_again_when_it_returns() -> None:
    server = EmbeddedRedis().start()
    try:
        registration = CountingRegistration(server.url, timeout_s=0.2)
        registration.register(NodeInfo("decode-0", "decode", "127.0.0.1:50051", "tiny", "cpu", 64, 16))
        load = LoadReport("decode-0", 0, 0, 10, 10)
        with LoadPublisher(registration, lambda: load):
            server.stop()  # Redis gone for 3 s: 20 ms retries would be ~150 attempts
            attempts_before = registration.attempts
            time.sleep(3.0)
            assert registration.attempts - attempts_before <= 12  # 20 ms doubling to 1 s: about 8
            server.restart()
            client = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 3.0
            while not client.exists(node_key("decode-0")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.exists(node_key("decode-0"))  # registered again within about a second
        registration.close()
    finally:
        server.stop()
