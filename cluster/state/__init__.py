"""Cluster state in Redis: the one package that owns its keys and their encoding.

records: NodeInfo, LoadReport, events, key names and JSON encoding (its docstring describes the key layout and the
life of a registration). node: NodeRegistration and LoadPublisher, what a node runs. view: ClusterView, what a
router runs. control: NodeControl, an operator's drain/resume/move of one node (written by a router, polled by the
node).
"""

from cluster.state.control import (
    CONTROL_TTL_S,
    NodeControl,
    clear_control,
    control_key,
    decode_control,
    encode_control,
    read_control,
    write_control,
)
from cluster.state.node import LoadPublisher, NodeRegistration
from cluster.state.records import (
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
from cluster.state.view import ClusterView

__all__ = [
    "CONTROL_TTL_S",
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
    "NodeControl",
    "NodeInfo",
    "NodeRegistration",
    "NodeState",
    "NotRegistered",
    "Role",
    "clear_control",
    "connect",
    "control_key",
    "decode_control",
    "decode_event",
    "decode_load",
    "decode_node",
    "encode_control",
    "encode_event",
    "encode_load",
    "encode_node",
    "load_key",
    "node_key",
    "read_control",
    "write_control",
]
