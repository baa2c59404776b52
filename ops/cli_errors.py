"""User errors of the `splitserve` command line, and the checks that find them before anything starts.

A command raises `UserError` for anything its user can fix (a file a flag names is missing, a port is taken, an
endpoint does not answer); `main` in ops/cli.py catches it once and prints it as one line,
`splitserve COMMAND: error: MESSAGE`, with exit code 2, never a traceback. Messages name the flag to change.

The checks here run before a command loads a model or starts a process, so that a mistake costs a second, not the
minutes a large model takes to load. They cannot rule out a race (a port taken between the check and the bind):
the servers report those themselves, in one line too.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from ops.cli_args import EXIT_USAGE

CONNECT_TIMEOUT_S = 5.0


class UserError(Exception):
    """Something the user can fix; its text is printed as one line (whitespace runs collapse to one space)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too (argparse's own prints the whole usage first);
    its subcommands' parsers are of this class as well."""

    def error(self, message: str) -> NoReturn:
        print(
            f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr, flush=True
        )
        raise SystemExit(EXIT_USAGE)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def require_file(path: Path | str | None, flag: str) -> None:
    """A readable file at `path` (None: the flag was not given)."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: No such file")  # as the OS says it
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: not readable")


def require_dir(path: Path | str | None, flag: str, what: str = "directory") -> None:
    """A readable directory at `path` (None: the flag was not given); `what` names it in the message."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: {what} does not exist")
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {path}: not readable")


def require_free_port(host: str, port: int, flag: str) -> None:
    """`port` on `host` can be listened on now (0, any free port, always can). Bound with SO_REUSEADDR as the
    servers bind, so a port that only has connections closing (TIME_WAIT) counts as free, as it is for them."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is in use (change {flag})") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"port {port} needs privileges to listen on (change {flag})") from None
            raise UserError(
                f"cannot listen on {host}:{port}: {exc.strerror} (change --host or {flag})"
            ) from None


def require_reachable(url: str, flag: str) -> None:
    """Something accepts TCP connections at the host and port of `url` (http, https or grpc), within a few seconds."""
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default_port
    except ValueError:  # a port that is not a number, or out of range
        port = None
    if not parts.hostname or port is None:
        raise UserError(
            f"{flag} {url}: give a host and port, e.g. grpc://127.0.0.1:50051 or http://HOST:PORT/v1"
        )
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except TimeoutError:
        raise UserError(f"{flag} {url}: no answer within {CONNECT_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"{flag} {url}: cannot connect to {parts.hostname}:{port} ({reason})") from None


def require_redis(url: str, flag: str) -> None:
    """Redis at `url` answers PING within a few seconds. Printed redacted: the URL may carry a password."""
    import redis

    from cluster.redis_server import redacted

    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
        )
        with client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:  # ValueError: not a redis:// URL
        raise UserError(f"{flag} {redacted(url)}: {exc}") from None
