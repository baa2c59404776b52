"""Test hosts on one machine: a network namespace per host, each joined to a bridge by a veth pair.

Every host has its own private address (10.77.N.x/24, N picked so that concurrent test runs do not collide) on an
`eth0` of its own, and `lo`. The root namespace holds the bridge's address (.1), so the test process (and a Redis
it starts there) reaches every host. Processes start in a host with `prefix(name) + command`.

Faults, with what this kernel offers (no netem, no iptables, no tc drop action; see platform-facts.md):
- `cut(name)` / `restore(name)`: the host's link down / up (it loses everyone, Redis included);
- `partition(a, b)` / `heal(a, b)`: blackhole routes both ways between two hosts, every other path untouched;
- `shape(name, rate, towards)`: an htb class limiting what `name` sends to the `towards` hosts only (shaping the whole
  interface would delay the nodes' Redis heartbeats and expire their 2 s lease); `sent_bytes(name)` counts what
  crossed that class.
Everything is removed on exit, also on failure: processes still in a namespace are killed first.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from types import TracebackType

from ops.launcher import Placement

COMMAND_TIMEOUT_S = 20.0


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=check)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ss-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` cannot run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetnsHosts:
    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.tag = f"ss{os.getpid() % 100000}"  # interface names have at most 15 characters
        self.subnet = self._free_subnet()
        self.bridge = f"{self.tag}br"
        self.bridge_address = f"10.77.{self.subnet}.1"
        self._addresses = {name: f"10.77.{self.subnet}.{10 + i}" for i, name in enumerate(self.names)}
        self._shaped: set[str] = set()

    # ---- names -------------------------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        return self._addresses[name]

    def namespace(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def prefix(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace(name))

    def placement(self, name: str, advertise_only: bool = False) -> Placement:
        """Where a cluster process on `name` runs; advertise_only: it listens on every interface (0.0.0.0) and
        advertises the host's address."""
        if advertise_only:
            return Placement("0.0.0.0", self.prefix(name), advertise_host=self.address(name))
        return Placement(self.address(name), self.prefix(name))

    def _veth(self, name: str) -> str:
        return f"{self.tag}v{self.names.index(name)}"

    @staticmethod
    def _free_subnet() -> int:
        used = _ip("-4", "addr", "show").stdout
        for subnet in [os.getpid() % 200 + 20, *range(20, 220)]:
            if f"10.77.{subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.77.N.0/24 subnet for test hosts")

    # ---- set-up and tear-down ------------------------------------------------------------------------------------

    def __enter__(self) -> NetnsHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name in self.names:
                ns, veth, peer = self.namespace(name), self._veth(name), f"{self._veth(name)}p"
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", peer, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs in the hosts, then delete them (their veths go with them) and the bridge."""
        namespaces = set(_ip("netns", "list", check=False).stdout.split())
        ours = [self.namespace(n) for n in self.names if self.namespace(n) in namespaces]
        for signal_name, grace_s in (("TERM", 2.0), ("KILL", 0.0)):
            pids = [p for ns in ours for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            subprocess.run(["kill", f"-{signal_name}", *pids], capture_output=True, check=False)
            time.sleep(grace_s)
        for ns in ours:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    # ---- faults --------------------------------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        _ip("link", "set", self._veth(name), "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self._veth(name), "up")

    def partition(self, a: str, b: str) -> None:
        """No packet between hosts a and b (either way); both still reach everyone else."""
        _ip("-n", self.namespace(a), "route", "add", "blackhole", f"{self.address(b)}/32")
        _ip("-n", self.namespace(b), "route", "add", "blackhole", f"{self.address(a)}/32")

    def heal(self, a: str, b: str) -> None:
        _ip("-n", self.namespace(a), "route", "del", "blackhole", f"{self.address(b)}/32", check=False)
        _ip("-n", self.namespace(b), "route", "del", "blackhole", f"{self.address(a)}/32", check=False)

    def _tc(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`tc` on host `name`'s eth0."""
        return _run("ip", "netns", "exec", self.namespace(name), "tc", *args, check=check)

    def shape(self, name: str, rate: str, towards: list[str]) -> None:
        """Limit what `name` sends to the `towards` hosts to `rate` (tc syntax: "1gbit"); the rest goes unshaped."""
        self.unshape(name)
        self._tc(
            name, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "20", "r2q", "1000"
        )
        self._tc(name, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", rate)
        self._tc(
            name, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", "100gbit"
        )
        for host in towards:
            destination = ["match", "ip", "dst", f"{self.address(host)}/32", "flowid", "1:10"]
            self._tc(
                name,
                "filter",
                "add",
                "dev",
                "eth0",
                "parent",
                "1:",
                "protocol",
                "ip",
                "prio",
                "1",
                "u32",
                *destination,
            )
        self._shaped.add(name)

    def unshape(self, name: str) -> None:
        self._tc(name, "qdisc", "del", "dev", "eth0", "root", check=False)  # none there: nothing to undo
        self._shaped.discard(name)

    def sent_bytes(self, name: str) -> int:
        """Bytes that left `name` through its shaped class so far (0 when it is not shaped)."""
        if name not in self._shaped:
            return 0
        shown = self._tc(name, "-s", "class", "show", "dev", "eth0", "classid", "1:10").stdout
        found = re.search(r"Sent (\d+) bytes", shown)
        return int(found.group(1)) if found else 0

    def received_bytes(self, name: str) -> int:
        """Bytes `name`'s eth0 has received so far."""
        shown = _ip("-n", self.namespace(name), "-s", "link", "show", "eth0").stdout
        # The line after "RX:" headers holds bytes first.
        lines = shown.splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("RX:"):
                return int(lines[i + 1].split()[0])
        raise RuntimeError(f"no RX counters for {name}: {shown}")

    def listening(self, name: str) -> list[tuple[str, int, int]]:
        """(local address, port, pid) of every TCP socket listening in host `name`."""
        shown = _run("ip", "netns", "exec", self.namespace(name), "ss", "-Htlnp").stdout
        found = []
        for line in shown.splitlines():
            fields = line.split()
            address, _, port = fields[3].rpartition(":")
            address = address.strip("[]").removeprefix("::ffff:")  # an IPv4 address on an IPv6 socket
            for pid in re.findall(r"pid=(\d+)", line):
                found.append((address, int(port), int(pid)))
        return found
