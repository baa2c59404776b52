"""CORS for the HTTP endpoint: browsers may call it from the origins the operator allowed (`--cors-allow-origin`).

Without allowed origins no CORS header is ever sent, so browsers keep pages from other origins out, and a preflight
(OPTIONS with Access-Control-Request-Method) gets a 403 in OpenAI's error shape saying how to allow one. With them, a
preflight from an allowed origin gets 204 with the allowed methods and the headers it asked for, and every response
to that origin carries Access-Control-Allow-Origin. "*" allows any origin (credentials are never allowed: an API
key travels in the Authorization header, which the preflight lists explicitly).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from router.http_error import HttpError

ALLOWED_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def enable_cors(app: web.Application, origins: Sequence[str]) -> None:
    """Answer preflights first (before authentication, which a browser's preflight never carries) and add the
    allow-origin header to every response as it is sent, streamed ones included."""
    allowed = frozenset(origins)

    def allowed_value(origin: str | None) -> str | None:
        if origin is None or not allowed:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin")
        allow = allowed_value(origin)
        if allow is None:
            err = HttpError(
                403,
                f"cross-origin requests from {origin!r} are not allowed (start the router with "
                "--cors-allow-origin ORIGIN)",
            )
            return web.json_response(err.body(), status=403)
        headers = {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            ),
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        }
        return web.Response(status=204, headers=headers)  # allow-origin: added by on_prepare below

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        allow = allowed_value(request.headers.get("Origin"))
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Vary"] = "Origin"

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(on_prepare)
