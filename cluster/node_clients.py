"""gRPC channels and stubs to the nodes, one channel per node address, reused across requests.

With a cluster token (cluster/auth.py) every call on these channels carries it: nodes refuse calls without it.
"""

from __future__ import annotations

from typing import Any

import grpc

from cluster.auth import with_cluster_token
from splitserve.v1 import cluster_pb2_grpc, inference_pb2_grpc

# Fail fast on a dead peer instead of waiting out TCP: a node killed at 3 a.m. must not stall requests.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class NodeClients:
    def __init__(self, cluster_token: str | None = None) -> None:
        self.cluster_token = cluster_token  # None: calls carry no token (nodes started without one)
        self._channels: dict[str, Any] = {}

    def _channel(self, address: str) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            plain = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            channel = with_cluster_token(plain, self.cluster_token)
            self._channels[address] = channel
        return channel

    def prefill(self, address: str) -> cluster_pb2_grpc.PrefillNodeStub:
        return cluster_pb2_grpc.PrefillNodeStub(self._channel(address))

    def decode(self, address: str) -> cluster_pb2_grpc.DecodeNodeStub:
        return cluster_pb2_grpc.DecodeNodeStub(self._channel(address))

    def colocated(self, address: str) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self._channel(address))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
