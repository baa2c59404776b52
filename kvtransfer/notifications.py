"""Notification payloads the prefill and decode nodes exchange over a KV transport.

A prefill node sends `kv-done:<request id>` only after every write of that request's KV has completed, so the decode
node may admit the request as soon as the notification arrives.

A prefill node that stops a transfer before its end (the router cancelled it, its compute failed, its deadline
passed) sends `kv-fence:<request id>` instead, after its last write of that request: a transport delivers one
peer's writes in order, so once the decode node has the fence no write of that request can still land, and the
blocks it had reserved can go to another request at once instead of after a quarantine.

The other way round, a decode node that sent a prefill node prefix blocks it lacked (DecodeNode.SendPrefix) sends
`kv-prefix:<request id>` after every write of them completed.
"""

from __future__ import annotations

KV_DONE_PREFIX = b"kv-done:"
KV_FENCE_PREFIX = b"kv-fence:"
KV_PREFIX_PREFIX = b"kv-prefix:"


def kv_done(request_id: str) -> bytes:
    return KV_DONE_PREFIX + request_id.encode()


def kv_fence(request_id: str) -> bytes:
    return KV_FENCE_PREFIX + request_id.encode()


def kv_prefix(request_id: str) -> bytes:
    return KV_PREFIX_PREFIX + request_id.encode()


def parse_kv_prefix(payload: bytes) -> str | None:
    """The request id of a kv-prefix notification, or None for any other payload."""
    return _request_id(payload, KV_PREFIX_PREFIX)


def parse_kv_done(payload: bytes) -> str | None:
    """The request id of a kv-done notification, or None for any other payload."""
    return _request_id(payload, KV_DONE_PREFIX)


def parse_kv_fence(payload: bytes) -> str | None:
    """The request id of a kv-fence notification, or None for any other payload."""
    return _request_id(payload, KV_FENCE_PREFIX)


def _request_id(payload: bytes, prefix: bytes) -> str | None:
    if payload.startswith(prefix):
        return payload[len(prefix) :].decode(errors="replace")
    return None
