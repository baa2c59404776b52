"""Which side of a KV transfer failed, told by the prefill node to the router in a failed Prefill call's metadata.

A Prefill call fails UNAVAILABLE both when the prefill node itself failed and when its decode peer did (refused the
connection, died mid-transfer, stopped taking writes). The router must exclude the node that failed, not the one
that reported it, so the prefill node adds the trailing metadata `splitserve-failed-side: decode` when the decode
peer is to blame; without it the prefill node is.
"""

from __future__ import annotations

from typing import Literal

import grpc

FAILED_SIDE_KEY = "splitserve-failed-side"
Side = Literal["prefill", "decode"]


def failed_side_metadata(side: Side) -> tuple[tuple[str, str], ...]:
    return ((FAILED_SIDE_KEY, side),)


def failed_side_of(exc: grpc.aio.AioRpcError) -> Side:
    """The side a failed Prefill call blames: "decode" only when the prefill node said so."""
    for key, value in exc.trailing_metadata() or ():
        if key == FAILED_SIDE_KEY and value == "decode":
            return "decode"
    return "prefill"
