"""Where a server listens (--host) and the address it tells others to dial (--advertise-host).

A node registers `advertise-host:port` in Redis for routers and peers, and its KV transport listens on that address
alone. The two differ when a server binds every interface (0.0.0.0 in a container) but is reached at one of them
(the pod's or host's IP); by default they are the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
_INFINIBAND = Path("/sys/class/infiniband")


def advertised_host(host: str, advertise_host: str | None) -> str:
    """The address to publish for a server bound on `host`; ValueError when a wildcard host has none to publish."""
    if advertise_host:
        if advertise_host in WILDCARD_HOSTS:
            raise ValueError(f"--advertise-host {advertise_host} is not an address others can dial")
        return advertise_host
    if host in WILDCARD_HOSTS:
        raise ValueError(
            f"--host {host} listens on every interface: give --advertise-host, the address others dial"
        )
    return host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def interface_of(host: str) -> str | None:
    """The network interface holding IPv4 address `host` in this network namespace, or None (not a local IPv4
    address, or a name)."""
    try:
        wanted = socket.inet_aton(host)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):  # an interface without an IPv4 address
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                if answer[20:24] == wanted:
                    return name
    return None


def ucx_net_devices(host: str) -> str | None:
    """A UCX_NET_DEVICES value that keeps UCX's TCP transport on the interface owning `host` and every RDMA port
    available (RDMA devices are named `mlx5_0:1`; restricting to the interface alone would drop them). None when the
    host is loopback or not a local address: UCX then chooses, as it does by default."""
    if is_loopback(host):
        return None
    interface = interface_of(host)
    if interface is None:
        return None
    rdma_ports = []
    if _INFINIBAND.is_dir():
        for device in sorted(_INFINIBAND.iterdir()):
            ports = device / "ports"
            if ports.is_dir():
                rdma_ports += [f"{device.name}:{port.name}" for port in sorted(ports.iterdir())]
    return ",".join([*rdma_ports, interface])


def default_ucx_net_devices(host: str) -> None:
    """Sets UCX_NET_DEVICES for `host` unless the user set it (UCX reads it when the first agent starts)."""
    if "UCX_NET_DEVICES" in os.environ:
        return
    devices = ucx_net_devices(host)
    if devices is not None:
        os.environ["UCX_NET_DEVICES"] = devices
