"""Cluster-state records and events: what goes into Redis comes back equal, and bad input is refused clearly."""

from __future__ import annotations

import json

import pytest

from cluster.state import (
    EVENTS_CHANNEL,
    INDEX_KEY,
    Event,
    InvalidRecord,
    LoadReport,
    NodeInfo,
    decode_event,
    decode_load,
    decode_node,
    encode_event,
    encode_load,
    encode_node,
    load_key,
    node_key,
)


def make_info(**changes: object) -> NodeInfo:
    fields: dict[str, object] = dict(
        node_id="decode-0",
        role="decode",
        address="10.0.0.7:50051",
        model="tiny-llama",
        machine_type="h100-80g",
        kv_capacity_blocks=4096,
        block_size=16,
        transport=bytes(range(256)),
        started_at=1_790_000_000.25,
    )
    fields.update(changes)
    return NodeInfo(**fields)  # type: ignore[arg-type]


def make_load(**changes: object) -> LoadReport:
    fields: dict[str, object] = dict(
        node_id="decode-0",
        queued_prompt_tokens=512,
        running_requests=3,
        free_kv_blocks=100,
        total_kv_blocks=4096,
        timestamp=1_790_000_001.5,
    )
    fields.update(changes)
    return LoadReport(**fields)  # type: ignore[arg-type]


def test_keys_are_versioned_and_named_once() -> None:
    assert node_key("decode-0") == "splitserve:v1:node:decode-0"
    assert load_key("decode-0") == "splitserve:v1:load:decode-0"
    assert INDEX_KEY == "splitserve:v1:nodes"
    assert EVENTS_CHANNEL == "splitserve:v1:events"


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_node_info_round_trips_with_every_byte_value(role: str) -> None:
    info = make_info(role=role)
    assert decode_node(encode_node(info)) == info
    assert decode_node(encode_node(info).decode()) == info


def test_node_info_is_json_with_base64_transport() -> None:
    obj = json.loads(encode_node(make_info(transport=b"\x00\xff")))
    assert obj["transport"] == "AP8=" and obj["role"] == "decode"


def test_ipv6_address_is_accepted() -> None:
    assert decode_node(encode_node(make_info(address="[::1]:50051"))).address == "[::1]:50051"


@pytest.mark.parametrize("draining", [False, True])
def test_load_report_round_trips(draining: bool) -> None:
    report = make_load(draining=draining)
    assert decode_load(encode_load(report)) == report


def test_unknown_fields_are_ignored_and_defaults_fill_missing_optional_ones() -> None:
    obj = json.loads(encode_load(make_load()))
    obj["added_in_a_later_release"] = 1
    del obj["draining"]
    assert decode_load(json.dumps(obj)) == make_load()


@pytest.mark.parametrize(
    "event",
    [
        Event("register", "decode-0", "a1b2", info=make_info()),
        Event("load", "decode-0", load=make_load()),
        Event("deregister", "decode-0"),
    ],
)
def test_events_round_trip(event: Event) -> None:
    assert decode_event(encode_event(event)) == event


def test_same_load_ignores_only_the_timestamp() -> None:
    report = make_load()
    assert report.same_load(make_load(timestamp=report.timestamp + 5))
    assert not report.same_load(make_load(free_kv_blocks=99))
    assert not report.same_load(make_load(draining=True))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(role="router"), "role must be one of prefill, decode, colocated"),
        (dict(node_id="has space"), "bad node_id"),
        (dict(node_id="a:b"), "bad node_id"),
        (dict(node_id=""), "bad node_id"),
        (dict(address="localhost"), "address must be host:port"),
        (dict(address="localhost:0"), "address must be host:port"),
        (dict(address=":50051"), "address must be host:port"),
        (dict(kv_capacity_blocks=-1), "kv_capacity_blocks"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=True), "block_size"),
        (dict(transport="text"), "transport must be bytes"),
    ],
)
def test_bad_node_info_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_info(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(running_requests=-1), "running_requests"),
        (dict(queued_prompt_tokens=1.5), "queued_prompt_tokens"),
        (dict(free_kv_blocks=5000), "free_kv_blocks exceeds"),
        (dict(timestamp=-1.0), "timestamp"),
        (dict(draining="yes"), "draining"),
    ],
)
def test_bad_load_report_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_load(**changes)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"node_id": "decode-0"}',  # fields missing
        encode_node(make_info()).replace(b'"decode"', b'"router"', 1),
        encode_node(make_info()).replace(b'"transport":"', b'"transport":"!', 1),
    ],
)
def test_malformed_node_records_raise_invalid_record(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        decode_node(data)


@pytest.mark.parametrize(
    "obj",
    [
        {"kind": "explode", "node_id": "decode-0"},
        {"kind": "deregister", "node_id": "bad id"},
        {"kind": "register", "node_id": "decode-0", "generation": "g"},  # no NodeInfo
        {"kind": "load", "node_id": "decode-0"},  # no LoadReport
        {
            "kind": "load",
            "node_id": "prefill-9",
            "load": json.loads(encode_load(make_load())),
        },  # someone else's
    ],
)
def test_malformed_events_raise_invalid_record(obj: dict[str, object]) -> None:
    with pytest.raises(InvalidRecord):
        decode_event(json.dumps(obj))
