"""Which address a server publishes, and which interface UCX's TCP transport is kept on (cluster/addresses.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster import addresses
from cluster.addresses import advertised_host, interface_of, ucx_net_devices


def test_the_listening_host_is_published_unless_another_is_given() -> None:
    assert advertised_host("10.0.0.5", None) == "10.0.0.5"
    assert advertised_host("0.0.0.0", "10.0.0.5") == "10.0.0.5"
    assert advertised_host("127.0.0.1", "node-3.cluster.local") == "node-3.cluster.local"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_a_wildcard_is_never_published(host: str) -> None:
    with pytest.raises(ValueError, match="--advertise-host"):
        advertised_host(host, None)
    with pytest.raises(ValueError, match="not an address others can dial"):
        advertised_host("10.0.0.5", host or "::")


def test_loopback_lives_on_lo_and_names_are_not_interfaces() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("localhost") is None
    assert interface_of("198.51.100.7") is None  # TEST-NET-2: no machine holds it


def test_ucx_keeps_its_choice_on_loopback_and_foreign_addresses() -> None:
    assert ucx_net_devices("127.0.0.1") is None
    assert ucx_net_devices("198.51.100.7") is None


def test_rdma_ports_stay_beside_the_interface(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for device, ports in (("mlx5_0", ["1"]), ("mlx5_1", ["1", "2"])):
        for port in ports:
            (tmp_path / device / "ports" / port).mkdir(parents=True)
    monkeypatch.setattr(addresses, "_INFINIBAND", tmp_path)
    monkeypatch.setattr(addresses, "interface_of", lambda host: "eth0" if host == "10.1.2.3" else None)
    assert ucx_net_devices("10.1.2.3") == "mlx5_0:1,mlx5_1:1,mlx5_1:2,eth0"


def test_a_user_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    monkeypatch.setattr(addresses, "ucx_net_devices", lambda host: "eth0")
    addresses.default_ucx_net_devices("10.1.2.3")
    assert os.environ["UCX_NET_DEVICES"] == "mlx5_0:1"
    monkeypatch.delenv("UCX_NET_DEVICES")
    addresses.default_ucx_net_devices("10.1.2.3")
    assert os.environ["UCX_NET_DEVICES"] == "eth0"
