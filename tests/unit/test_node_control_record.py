"""NodeControl, an operator's drain/resume/move record: what goes into Redis comes back equal, bad input is refused."""

from __future__ import annotations

import json
import time

import pytest

from cluster.state import (
    ROLES,
    InvalidRecord,
    NodeControl,
    control_key,
    decode_control,
    encode_control,
    node_key,
)


def test_the_key_sits_beside_the_nodes_keys() -> None:
    assert control_key("decode-0") == "splitserve:v1:control:decode-0"
    assert control_key("decode-0").rsplit(":", 2)[0] == node_key("decode-0").rsplit(":", 2)[0]


@pytest.mark.parametrize(
    "control",
    [
        NodeControl(drain=True, requested_at=1_790_000_000.5),
        NodeControl(drain=False, requested_at=1_790_000_001.0),
        *(NodeControl(pool=role, requested_at=1_790_000_002.25) for role in ROLES),
        NodeControl(drain=True, pool="decode", requested_at=0),
    ],
)
def test_a_control_round_trips(control: NodeControl) -> None:
    assert decode_control(encode_control(control)) == control
    assert decode_control(encode_control(control).decode()) == control  # text as well as bytes


def test_the_encoding_is_plain_json_with_null_for_no_pool() -> None:
    obj = json.loads(encode_control(NodeControl(drain=True, requested_at=12.5)))
    assert obj == {"drain": True, "pool": None, "requested_at": 12.5}


def test_absent_fields_take_their_defaults_and_unknown_ones_are_ignored() -> None:
    control = decode_control(
        json.dumps({"pool": "prefill", "requested_at": 3.0, "reason": "rebalance", "v": 2})
    )
    assert control == NodeControl(drain=False, pool="prefill", requested_at=3.0)
    assert decode_control("{}").drain is False and decode_control("{}").pool is None


def test_requested_at_defaults_to_now() -> None:
    before = time.time()
    control = NodeControl(drain=True)
    assert before <= control.requested_at <= time.time()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"pool": "gpu"}, "pool must be one of prefill, decode, colocated"),
        ({"pool": "Decode"}, "pool must be one of"),
        ({"pool": 1}, "pool must be one of"),
        ({"drain": "yes"}, "drain must be a bool"),
        ({"drain": 1}, "drain must be a bool"),
        ({"requested_at": -1}, "requested_at must be unix seconds"),
        ({"requested_at": True}, "requested_at must be unix seconds"),
        ({"requested_at": "now"}, "requested_at must be unix seconds"),
    ],
)
def test_bad_fields_are_refused_by_the_record_and_by_the_decoder(
    fields: dict[str, object], complaint: str
) -> None:
    with pytest.raises(InvalidRecord, match=complaint):
        decode_control(json.dumps({"requested_at": 1.0, **fields}))
    with pytest.raises(ValueError, match=complaint):
        NodeControl(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"not json", b"[true]", b'"drain"', b"\xff\xfe"])
def test_what_is_not_a_json_object_is_an_invalid_record(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        decode_control(data)


def test_a_control_is_immutable() -> None:
    control = NodeControl(drain=True)
    with pytest.raises(AttributeError):
        control.drain = False  # type: ignore[misc]
