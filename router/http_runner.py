"""An aiohttp AppRunner whose low-level errors are OpenAI-shaped JSON too.

aiohttp's HTTP parser rejects a bad request line, bad headers or a broken chunked body before any middleware runs,
and answers from `RequestHandler.handle_error` in plain text ("400 Bad Request ..."). aiohttp builds that handler
class inside `web.Server.__call__` with no option to change it, so this runner makes its Server build a subclass
whose `handle_error` answers {"error": {...}} with the same status. The connection is still closed afterwards, as
aiohttp does, since the parser cannot tell where the next request would start.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.http_error import HttpError

LINGER_S = 5.0


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs, and refuses if bytes were sent
        if status >= 500:
            text = "internal error"
        else:
            text = message or (str(exc) if exc else "") or "the request could not be parsed"
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = HttpError(status, str(text), type_=kind).body()
        response = web.Response(status=plain.status, text=json.dumps(body), content_type="application/json")
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """web.AppRunner, but parser-level errors are answered in OpenAI's JSON error shape, and a body left unread
    (a 413) is drained for at most LINGER_S before the connection closes (aiohttp's default: 10 s)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, lingering_time=LINGER_S, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state, only __call__ differs: the handler class it builds
        return server
