"""Reading an HTTP request's JSON body so that no body can hold the router or answer with a 500.

1. The declared Content-Length is checked before anything is read: over the limit is 413 at once. aiohttp then
   reads and drops what the client still sends for at most LINGER_S (router/http_runner.py) and closes, so an
   honest client that is still uploading reads the 413 instead of a connection reset.
2. The body is read within a deadline: a client that stops sending gets 408 and the connection is closed at once.
   A body without a length that grows past the limit is 413 too.
3. The bytes must be UTF-8 (a UTF-16 body or broken bytes are 400) and parse as JSON; numbers with more digits than
   Python converts (ValueError) and nesting deep enough for RecursionError are 400 naming the problem.
4. The parsed value is walked (without recursion) to refuse lone surrogates ("\\ud800" escapes, which no tokenizer or
   UTF-8 encoder accepts) and nesting deeper than MAX_DEPTH.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from router.http_error import HttpError

MAX_BODY_BYTES = 8 * 1024 * 1024  # every JSON route's limit: larger bodies get a 413 before being read
MAX_DEPTH = 32  # far beyond any real OpenAI request (content parts are 4 deep)


async def read_json(request: web.Request, max_bytes: int, timeout_s: float) -> Any:
    """The request's body as a JSON value; HttpError (400, 408 or 413) when it cannot be one."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise HttpError(413, f"the request body is larger than {max_bytes} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {timeout_s:g} s", close=True) from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, f"the request body is larger than {max_bytes} bytes") from None
    except (web.HTTPException, ConnectionError, ValueError) as exc:  # e.g. a broken chunked encoding
        raise HttpError(400, f"the request body could not be read: {exc}", close=True) from exc
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(
            400, f"the request body is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"the request body is not valid JSON: {exc.msg} (at char {exc.pos})") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise HttpError(400, f"the request body has a value out of range: {exc}") from None
    except RecursionError:
        raise HttpError(400, f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    _check_values(value)
    return value


def _check_values(value: Any) -> None:
    """Refuse lone surrogates in any string (key or value) and nesting deeper than MAX_DEPTH."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise HttpError(400, f"the request body is nested deeper than {MAX_DEPTH} levels")
            children: Iterable[Any] = item
            if isinstance(item, dict):
                for key in item:
                    _check_string(key)
                children = item.values()
            stack.extend((child, depth + 1) for child in children if isinstance(child, str | dict | list))


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HttpError(
            400, f"the request body has a lone surrogate ({text[exc.start]!r}): strings must be valid Unicode"
        ) from None
