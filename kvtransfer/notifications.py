"""Notification payloads the prefill and decode nodes exchange over a KV transport.

A prefill node sends `kv-done:<request id>` only after every write of that request's KV has completed, so the decode
node may admit the request as soon as the notification arrives.
"""

from __future__ import annotations

KV_DONE_PREFIX = b"kv-done:"


def kv_done(request_id: str) -> bytes:
    return KV_DONE_PREFIX + request_id.encode()


def parse_kv_done(payload: bytes) -> str | None:
    """The request id of a kv-done notification, or None for any other payload."""
    if payload.startswith(KV_DONE_PREFIX):
        return payload[len(KV_DONE_PREFIX) :].decode(errors="replace")
    return None
