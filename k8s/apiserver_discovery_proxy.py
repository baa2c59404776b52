"""A loopback HTTP proxy that adds the discovery documents a standalone apiextensions-apiserver lacks.

kube-apiserver answers GET /api and GET /apis itself (through its aggregator); the apiextensions-apiserver alone
serves only /apis/<group>... paths, and kopf and the kubernetes client's DynamicClient start from /api and /apis.
This proxy answers /apis from the server's own CRDs, /api and /api/v1 with the namespaces kind only (kopf waits
for it), and forwards everything else (watches streamed) over TLS with the client certificate. Test tooling for k8s/test-apiserver.sh only.

Usage: python k8s/apiserver_discovery_proxy.py UPSTREAM_URL CA_FILE CERT_FILE KEY_FILE PORT
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "host", "keep-alive"}
# Watches stay open for minutes; every other request is bounded by the client's own timeout.
NO_TIMEOUT = ClientTimeout(total=None, sock_connect=10)


def make_app(upstream: str, tls: ssl.SSLContext) -> web.Application:
    app = web.Application()

    async def open_session(app: web.Application) -> Any:
        app["session"] = ClientSession(upstream, connector=TCPConnector(ssl=tls), timeout=NO_TIMEOUT)
        yield
        await app["session"].close()

    async def core_versions(request: web.Request) -> web.Response:
        return web.json_response(
            {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        )

    async def core_resources(request: web.Request) -> web.Response:
        # kopf waits for the namespaces kind to exist before it watches anything (it lists namespaces only when
        # run for named namespaces, so run the operator with --all-namespaces here).
        namespaces = {
            "name": "namespaces",
            "singularName": "namespace",
            "namespaced": False,
            "kind": "Namespace",
        }
        namespaces["verbs"] = ["get", "list", "watch"]
        return web.json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": [namespaces]})

    async def groups(request: web.Request) -> web.Response:
        session: ClientSession = request.app["session"]
        names = {"apiextensions.k8s.io": ["v1"]}
        async with session.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions") as response:
            response.raise_for_status()
            for item in (await response.json())["items"]:
                served = [v["name"] for v in item["spec"]["versions"] if v.get("served")]
                names.setdefault(item["spec"]["group"], []).extend(served)
        return web.json_response(
            {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(n, v) for n, v in names.items()]}
        )

    async def forward(request: web.Request) -> web.StreamResponse:
        session: ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        # Forward the body as it came: aiohttp would label a body without a Content-Type as octet-stream, which
        # the API server refuses (the kubernetes client sends JSON bodies without one).
        async with session.request(
            request.method,
            request.rel_url,
            headers=headers,
            data=body or None,
            skip_auto_headers=["Content-Type"],
        ) as upstream_response:
            reply = web.StreamResponse(status=upstream_response.status)
            for key, value in upstream_response.headers.items():
                if key.lower() not in HOP_HEADERS:
                    reply.headers[key] = value
            await reply.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await reply.write(chunk)
            await reply.write_eof()
            return reply

    app.cleanup_ctx.append(open_session)
    app.router.add_get("/api", core_versions)
    app.router.add_get("/api/v1", core_resources)
    app.router.add_get("/apis", groups)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def main(upstream: str, ca: str, cert: str, key: str, port: int) -> None:
    tls = ssl.create_default_context(cafile=ca)
    tls.load_cert_chain(cert, key)
    web.run_app(make_app(upstream, tls), host="127.0.0.1", port=port, print=None, handle_signals=True)


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
