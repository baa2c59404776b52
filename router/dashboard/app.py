"""The ops dashboard on the router's HTTP port: a static page plus a small JSON API it reads and acts through.

Routes (added to the router's aiohttp app):
- GET  /dashboard                          the page (static/index.html; its script and style sheet beside it)
- GET  /dashboard/static/{file}            the page's assets, shipped in the package: no build step
- GET  /dashboard/api/state                one snapshot (router/dashboard/snapshot.py)
- GET  /dashboard/api/events               server-sent events: a snapshot every second, until the client leaves
- GET  /dashboard/api/requests/{id}        one recent request with its time split by phase
- POST /dashboard/api/nodes/{id}/drain     {"drain": true|false}: stop (or resume) new work on a node
- POST /dashboard/api/nodes/{id}/move      {"pool": "prefill"|"decode"|"colocated"}: the node restarts in that pool
Reads are open like /metrics (they show what /metrics shows). Actions change the cluster, so with an API key set
they need `Authorization: Bearer <key>` (401 otherwise). An action is written to the node's control record in Redis
(cluster/state/control.py); the node applies it within a fraction of a second and its next load report shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import redis
from aiohttp import web

from cluster.state import ROLES, InvalidRecord, NodeControl, connect, read_control, write_control
from router.auth import bearer_matches
from router.dashboard.snapshot import DashboardSource, snapshot
from router.http_error import HttpError

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
EVENT_INTERVAL_S = 1.0
REDIS_TIMEOUT_S = 2.0
_SOURCE = web.AppKey("dashboard_source", DashboardSource)
_STOPPING = web.AppKey("dashboard_stopping", asyncio.Event)


def add_dashboard(app: web.Application, source: DashboardSource, redis_url: str, api_key: str | None) -> None:
    actions = _Actions(source, redis_url, api_key)
    app[_SOURCE] = source
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stop_streams)  # open event streams end before the server waits for connections
    app.on_cleanup.append(actions.close)
    app.router.add_get("/dashboard", _page)
    app.router.add_get("/dashboard/static/{name}", _asset)
    app.router.add_get("/dashboard/api/state", _state)
    app.router.add_get("/dashboard/api/events", _events)
    app.router.add_get("/dashboard/api/requests/{request_id}", _request)
    app.router.add_post("/dashboard/api/nodes/{node_id}/drain", actions.drain)
    app.router.add_post("/dashboard/api/nodes/{node_id}/move", actions.move)


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:  # a fixed list: nothing else under the package can be read through this route
        raise HttpError(404, f"no dashboard asset {name!r}")
    return web.FileResponse(
        STATIC_DIR / name, headers={"Content-Type": ASSETS[name], "Cache-Control": "no-cache"}
    )


async def _state(request: web.Request) -> web.StreamResponse:
    return web.json_response(snapshot(request.app[_SOURCE]))


async def _events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    stopping = request.app[_STOPPING]
    while not stopping.is_set():
        data = json.dumps(snapshot(request.app[_SOURCE]), separators=(",", ":"))
        try:
            await response.write(f"event: state\ndata: {data}\n\n".encode())
        except (ConnectionResetError, RuntimeError):  # the page was closed
            break
        with contextlib.suppress(TimeoutError):  # the next snapshot is due
            await asyncio.wait_for(stopping.wait(), EVENT_INTERVAL_S)
    return response


async def _stop_streams(app: web.Application) -> None:
    app[_STOPPING].set()


async def _request(request: web.Request) -> web.StreamResponse:
    request_id = request.match_info["request_id"]
    record = request.app[_SOURCE].requests.get(request_id)
    if record is None:
        raise HttpError(404, f"no recent request {request_id!r} (the router keeps the last few hundred)")
    return web.json_response(record.to_json())


class _Actions:
    def __init__(self, source: DashboardSource, redis_url: str, api_key: str | None) -> None:
        self.source = source
        self.redis_url = redis_url
        self.api_key = api_key
        self._client: redis.Redis | None = None

    async def drain(self, request: web.Request) -> web.StreamResponse:
        node_id, body = await self._authorized(request)
        drain = body.get("drain", True)
        if not isinstance(drain, bool):
            raise HttpError(400, '"drain" must be true or false')
        control = await self._update(node_id, drain=drain)
        return web.json_response({"node_id": node_id, "drain": control.drain, "pool": control.pool})

    async def move(self, request: web.Request) -> web.StreamResponse:
        node_id, body = await self._authorized(request)
        pool = body.get("pool")
        if pool not in ROLES:
            raise HttpError(400, f'"pool" must be one of {", ".join(ROLES)}, not {pool!r}')
        state = self.source.view.get(node_id)
        if state is not None and state.info.role == pool:
            raise HttpError(409, f"node {node_id} is already in the {pool} pool")
        control = await self._update(node_id, pool=pool)
        return web.json_response({"node_id": node_id, "drain": control.drain, "pool": control.pool})

    async def _authorized(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        """The node an action is for, and the action's JSON body; 401, 404 or 400 before anything is written."""
        if self.api_key and not bearer_matches(request.headers.get("Authorization", ""), self.api_key):
            raise HttpError(401, "this action needs the API key (Authorization: Bearer <key>)")
        node_id = request.match_info["node_id"]
        if self.source.view.get(node_id) is None:
            raise HttpError(404, f"no live node {node_id!r}")
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise HttpError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return node_id, body

    async def _update(self, node_id: str, **changes: Any) -> NodeControl:
        """Merge `changes` into the node's control record (a drain survives a later move request and back)."""

        def write() -> NodeControl:
            client = self._redis()
            try:
                current = read_control(client, node_id) or NodeControl()
            except InvalidRecord:  # not ours to repair: this write replaces it
                current = NodeControl()
            fields = {"drain": current.drain, "pool": current.pool, **changes, "requested_at": time.time()}
            control = NodeControl(**fields)
            write_control(client, node_id, control)
            return control

        try:
            return await asyncio.to_thread(write)
        except redis.RedisError as exc:
            raise HttpError(503, f"cluster state (Redis) unavailable: {exc}") from None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.redis_url, timeout_s=REDIS_TIMEOUT_S)
        return self._client

    async def close(self, app: web.Application) -> None:
        if self._client is not None:
            self._client.close()
