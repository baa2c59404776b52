"""Server-sent events for the HTTP endpoints that stream (chat/completions, /v1/responses)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


async def open_event_stream(
    request: web.Request, items: AsyncIterator[T]
) -> tuple[web.StreamResponse, AsyncIterator[T]]:
    """The 200 event-stream response, prepared only after the first item arrived, so that a request that cannot even
    start (no node, a bad sampling value) fails with its own status; and the items with that first one put back."""
    first = await anext(items, None)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response, _chain([] if first is None else [first], items)


async def send_event(response: web.StreamResponse, payload: dict[str, Any], event: str | None = None) -> None:
    """One event: its JSON payload, under an `event:` name when given (the Responses API names its events)."""
    head = f"event: {event}\n" if event else ""
    await response.write(f"{head}data: {json.dumps(payload)}\n\n".encode())


async def _chain(first: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in first:
        yield item
    async for item in rest:
        yield item
