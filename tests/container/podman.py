"""A small podman driver for the container tests: run detached containers, read their logs, stop and remove them.

Rootful podman runs containers on this project's machines only with runc and a containers.conf that sets no
default ulimits and cgroupfs (README.md, "Container image"; crun fails there on setrlimit, with hybrid cgroups).
`Podman` writes that file and hands it to each podman command through CONTAINERS_CONF, so the host's own
configuration is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
COMMAND_TIMEOUT_S = 120.0


class ContainerFailed(RuntimeError):
    """A container exited, or did not print what was awaited in time; the text ends with its last log lines."""


@dataclass(frozen=True, slots=True)
class Mount:
    host: Path
    container: str
    read_only: bool = True

    def flag(self) -> str:
        return f"--volume={self.host}:{self.container}" + (":ro" if self.read_only else "")


class Podman:
    def __init__(self, conf_dir: Path) -> None:
        conf = conf_dir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    @staticmethod
    def installed() -> bool:
        return shutil.which("podman") is not None

    def command(
        self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout_s,
            check=False,
        )

    def image_exists(self, image: str) -> bool:
        return self.command("image", "exists", image).returncode == 0

    def run_detached(
        self,
        name: str,
        image: str,
        args: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        entrypoint: str | None = None,
    ) -> None:
        """Starts a container on the host's network. `env` reaches it by name (`--env NAME`, the value taken from
        podman's own environment), so secrets stay out of podman's argv, which `ps` shows to every user."""
        flags = ["--detach", f"--name={name}", "--network=host"]
        flags += [mount.flag() for mount in mounts]
        flags += [f"--env={env_name}" for env_name in env or {}]
        if entrypoint is not None:
            flags.append(f"--entrypoint={entrypoint}")
        result = self.command("run", *flags, image, *args, env=env)
        if result.returncode != 0:
            raise ContainerFailed(f"podman run {name}: {result.stderr.strip()}")

    def run_once(
        self, image: str, args: Sequence[str], *, mounts: Sequence[Mount] = (), entrypoint: str
    ) -> str:
        """Runs a command in a fresh container to its end and returns its output; ContainerFailed if it fails."""
        flags = ["--rm", "--network=host", f"--entrypoint={entrypoint}", *(m.flag() for m in mounts)]
        result = self.command("run", *flags, image, *args, timeout_s=600.0)
        if result.returncode != 0:
            raise ContainerFailed(
                f"{entrypoint} {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}"
            )
        return result.stdout

    def logs(self, name: str) -> str:
        result = self.command("logs", name)
        return result.stdout + result.stderr

    def exit_code(self, name: str) -> int | None:
        """None while the container runs."""
        state = json.loads(self.command("inspect", "--format={{json .State}}", name).stdout or "{}")
        return None if state.get("Running", False) else int(state.get("ExitCode", -1))

    def await_ready_line(self, name: str, timeout_s: float) -> dict[str, object]:
        """The JSON `{"event": "ready", ...}` line a splitserve server prints on stdout once it serves."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.command("logs", name).stdout.splitlines():
                if line.startswith("{") and '"ready"' in line:
                    event: dict[str, object] = json.loads(line)
                    if event.get("event") == "ready":
                        return event
            if self.exit_code(name) is not None:
                raise ContainerFailed(f"{name} exited {self.exit_code(name)}:\n{self.tail(name)}")
            time.sleep(0.5)
        raise ContainerFailed(f"{name} printed no ready line within {timeout_s:.0f} s:\n{self.tail(name)}")

    def stop(self, name: str, timeout_s: int) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; the container's exit code."""
        self.command("stop", f"--time={timeout_s}", name, timeout_s=timeout_s + COMMAND_TIMEOUT_S)
        return self.exit_code(name)

    def remove(self, names: Sequence[str]) -> None:
        """Removes the containers, running or not; names that do not exist are fine."""
        if names:
            self.command("rm", "--force", "--ignore", "--time=0", *names)

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.logs(name).splitlines()[-lines:])
