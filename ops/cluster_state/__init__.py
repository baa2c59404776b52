"""Cluster state in Redis: the one package that owns its keys and their encoding.

records: NodeInfo, LoadReport, events, key names and JSON encoding (its docstring describes the key layout and the
life of a registration). node: NodeRegistration and LoadPublisher, what a node runs. view: ClusterView, what a
router runs.
"""

from ops.cluster_state.node import LoadPublisher, NodeRegistration
from ops.cluster_state.records import (
    DEFAULT_RESYNC_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TTL_S,
    EVENTS_CHANNEL,
    INDEX_KEY,
    KEY_PREFIX,
    ROLES,
    ClusterStateUnavailable,
    Event,
    EventKind,
    InvalidRecord,
    LoadReport,
    NodeInfo,
    NodeState,
    NotRegistered,
    Role,
    connect,
    decode_event,
    decode_load,
    decode_node,
    encode_event,
    encode_load,
    encode_node,
    load_key,
    node_key,
)
from ops.cluster_state.view import ClusterView

__all__ = [
    "DEFAULT_RESYNC_S",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TTL_S",
    "EVENTS_CHANNEL",
    "INDEX_KEY",
    "KEY_PREFIX",
    "ROLES",
    "ClusterStateUnavailable",
    "ClusterView",
    "Event",
    "EventKind",
    "InvalidRecord",
    "LoadPublisher",
    "LoadReport",
    "NodeInfo",
    "NodeRegistration",
    "NodeState",
    "NotRegistered",
    "Role",
    "connect",
    "decode_event",
    "decode_load",
    "decode_node",
    "encode_event",
    "encode_load",
    "encode_node",
    "load_key",
    "node_key",
]
