"""Operator control of one node through Redis: drain it, resume it, or move it to another pool.

An operator (the router's ops dashboard) writes a `NodeControl` under the node's control key; the node polls that key
(cluster/node/control.py) and applies it:

    splitserve:v1:control:<id>   string: JSON NodeControl. Written by `write_control` with a TTL of one day, which the
                                 node renews each time it reads the key, so a control outlives only a node that never
                                 comes back. The node's `deregister()` deletes it (a node that stops or moves leaves
                                 no control behind for the next process under its id).

A control is the desired state, not a command: writing the same record twice does nothing new, and deleting the key
(`clear_control`) means "no operator action", so a drained node resumes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import redis

from cluster.state.records import (
    KEY_PREFIX,
    ROLES,
    Role,
    _check,
    _check_node_id,
    _dumps,
    _from_json,
    _is_time,
    _loads,
)

CONTROL_TTL_S = 24 * 3600


def control_key(node_id: str) -> str:
    return f"{KEY_PREFIX}control:{node_id}"


@dataclass(frozen=True, slots=True)
class NodeControl:
    """What an operator wants of one node."""

    # True: take no new work, finish what is in flight, stay registered (as unusable). False: serve (resume).
    drain: bool = False
    # The role the node must come back in (it drains and restarts as the same process); None: keep its role.
    pool: Role | None = None
    requested_at: float = field(default_factory=time.time)  # unix seconds when the operator asked

    def __post_init__(self) -> None:
        _check(isinstance(self.drain, bool), f"drain must be a bool, not {self.drain!r}")
        _check(
            self.pool is None or self.pool in ROLES,
            f"pool must be one of {', '.join(ROLES)} (or null), not {self.pool!r}",
        )
        _check(_is_time(self.requested_at), f"requested_at must be unix seconds, not {self.requested_at!r}")


def encode_control(control: NodeControl) -> bytes:
    return _dumps(dataclasses.asdict(control))


def decode_control(data: bytes | str) -> NodeControl:
    """InvalidRecord for anything but a valid NodeControl (unknown fields are ignored)."""
    return _from_json(NodeControl, _loads(data))


def write_control(client: redis.Redis, node_id: str, control: NodeControl) -> None:
    """Asks node `node_id` for `control`, replacing any earlier control; the node applies it within a poll (0.25 s).

    Nothing checks that the node exists: a control written for a node not yet up applies when it starts.
    """
    _check_node_id(node_id)
    client.set(control_key(node_id), encode_control(control), ex=CONTROL_TTL_S)


def read_control(client: redis.Redis, node_id: str, *, renew: bool = False) -> NodeControl | None:
    """The control asked of `node_id`, None if there is none; InvalidRecord if the key holds something else.

    renew: also restart the key's TTL (what the node itself does on every poll).
    """
    _check_node_id(node_id)
    key = control_key(node_id)
    if renew:
        pipe = client.pipeline(transaction=False)
        pipe.get(key)
        pipe.expire(key, CONTROL_TTL_S)  # a no-op when the key is absent
        data = pipe.execute()[0]
    else:
        data = client.get(key)
    return None if data is None else decode_control(data)


def clear_control(client: redis.Redis, node_id: str) -> None:
    """Withdraws any control of `node_id`: a drained node resumes (a move already under way goes on)."""
    _check_node_id(node_id)
    client.delete(control_key(node_id))
