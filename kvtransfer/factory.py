"""create_transport: a backend by name, its module imported only then (NIXL's import alone loads UCX)."""

from __future__ import annotations

import importlib
from typing import Any

from kvtransfer.base import KVTransport

# name -> (module, class); the module is imported on first use.
BACKENDS = {
    "nixl": ("kvtransfer.backends.nixl_backend", "NixlTransport"),
    "torch": ("kvtransfer.backends.torch_backend", "TorchTransport"),
}


def create_transport(name: str, node_id: str, **options: Any) -> KVTransport:
    """A new transport of backend `name` for node `node_id`; options go to the backend's constructor.

    nixl: transfer_timeout_s, num_threads. torch: host, port, connect_timeout_s, transfer_timeout_s.
    ValueError for an unknown name; ImportError if the backend's package (nixl) is not installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    transport: KVTransport = getattr(importlib.import_module(module_name), class_name)(node_id, **options)
    return transport
