"""The router's OpenAI-compatible HTTP endpoint (aiohttp on the router's event loop).

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming as server-sent events ending in
`data: [DONE]`, or not), GET /v1/models, GET /healthz (the process is up), GET /readyz (router/readiness.py),
GET /metrics (Prometheus text: router/metrics.py), and the probes and tokenizer endpoints of
router/openai_extras.py (/health, /version, /v1/models/{id}, /tokenize, /detokenize), POST /v1/responses
(router/responses_api.py); CORS in router/cors.py.
`usage` adds splitserve's energy and cost of the request.
A request becomes one Generate stream per prompt and candidate (router/openai_protocol.py), through the same
placement and relay as gRPC, its bodies built by router/openai_responses.py; a client that disconnects
mid-stream closes them, which aborts the request on its nodes. With an API key set, /v1/*, /tokenize and
/detokenize need `Authorization: Bearer <key>` (401 otherwise).

A request's life here: read the body (router/http_body.py: size checked before reading, 413; a read deadline,
408; UTF-8 JSON without lone surrogates or absurd nesting, 400) -> parse and tokenize (long prompts on the encoder's
threads, never on this loop) -> take n admission slots (router/admission.py; 429 with Retry-After when the router is
full) -> relay. Every error, down to aiohttp's own parser errors (router/http_runner.py), is OpenAI-shaped JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from opentelemetry.context import Context

from cluster import tracing
from router.admission import RETRY_AFTER_S, Overloaded
from router.auth import bearer_matches
from router.cors import enable_cors
from router.errors import RouterError
from router.http_body import MAX_BODY_BYTES, read_json
from router.http_error import HttpError
from router.inference import InferenceService
from router.openai_extras import ExtraEndpoints
from router.openai_protocol import ParsedRequest, parse_request
from router.openai_responses import ResponseBuilder, StreamResult
from router.prompt_encoder import EncoderBusy
from router.readiness import readiness
from router.responses_api import ResponsesEndpoint
from router.sse import open_event_stream, send_event
from router.tool_parsers import ToolFormat, resolve_format
from splitserve.v1 import inference_pb2 as pb

BODY_TIMEOUT_S = 10.0  # a request body must arrive within this (408 otherwise)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEYED_PREFIXES = (
    "/v1/",
    "/tokenize",
    "/detokenize",
)  # what an API key guards; probes and /metrics stay open
_log = logging.getLogger(__name__)


def create_app(
    service: InferenceService,
    api_key: str | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
    cors_origins: Sequence[str] = (),
    tool_call_parser: str = "auto",
) -> web.Application:
    extras = ExtraEndpoints(
        service.config.model_name,
        service.encoder,
        service.config.max_model_len,
        service.config.vocab_size,
        body_timeout_s,
    )
    tool_format = resolve_format(tool_call_parser, service.tokenizer.chat_template)
    api = _OpenAIApi(service, body_timeout_s, extras.model_card, tool_format)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors, _auth(api_key)])
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    extras.add_routes(app)
    ResponsesEndpoint(service, body_timeout_s).add_routes(app)  # POST /v1/responses
    enable_cors(app, cors_origins)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as exc:
        response = web.json_response(exc.body(), status=exc.status)
        if exc.close:
            await _answer_and_close(request, response)
        return response
    except (Overloaded, EncoderBusy) as exc:
        err = HttpError(429, str(exc), type_="rate_limit_error", code="overloaded")
        return web.json_response(err.body(), status=429, headers={"Retry-After": str(RETRY_AFTER_S)})
    except RouterError as exc:
        err = HttpError.from_router(exc)
        return web.json_response(err.body(), status=err.status)
    except web.HTTPRequestEntityTooLarge:
        err = HttpError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        return web.json_response(err.body(), status=413)
    except web.HTTPException as exc:  # 404 for unknown paths, 405 for wrong methods: keep OpenAI's shape
        err = HttpError(exc.status, exc.reason or "error")
        return web.json_response(err.body(), status=exc.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client left: nobody to answer
    except Exception as exc:  # a bug: still answer in OpenAI's shape, and log it with its traceback
        _log.exception("unhandled error serving %s %s", request.method, request.path)
        err = HttpError(500, f"internal error: {type(exc).__name__}", type_="server_error")
        return web.json_response(err.body(), status=500)


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send response, then close the connection at once: the body was never read, so the connection cannot carry
    another request, and aiohttp would otherwise keep reading ("lingering") for up to 10 s."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


def _auth(api_key: str | None) -> Any:  # an aiohttp middleware
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            api_key
            and request.path.startswith(_KEYED_PREFIXES)
            and not bearer_matches(request.headers.get("Authorization", ""), api_key)
        ):
            raise HttpError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check


class _OpenAIApi:
    def __init__(
        self,
        service: InferenceService,
        body_timeout_s: float,
        model_card: Callable[[], dict[str, Any]],
        tool_format: ToolFormat | None,
    ) -> None:
        self.service = service
        self.model = service.config.model_name
        self.body_timeout_s = body_timeout_s
        self.model_card = model_card
        self.tool_format = tool_format

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        state = readiness(self.service.view)  # router/readiness.py: a usable prefill path and a fresh view
        return web.json_response(state.body(), status=200 if state.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.service.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card()]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json(request, MAX_BODY_BYTES, self.body_timeout_s)
        config = self.service.config
        parsed = await parse_request(
            body,
            chat=chat,
            encoder=self.service.encoder,
            model_name=self.model,
            max_model_len=config.max_model_len,
            vocab_size=config.vocab_size,
            tool_format=self.tool_format,
        )
        for prompt in parsed.prompts:
            self.service.check_prompt(prompt)
        builder = ResponseBuilder(parsed, self.service.tokenizer, self.model)
        # A W3C traceparent header makes the request's trace a child of the caller's (when tracing is on here).
        parent = tracing.context_from_metadata([(k.lower(), v) for k, v in request.headers.items()])
        # Each candidate of each prompt is one Generate stream on the nodes, so a request holds that many slots.
        async with self.service.admission.slot(parsed.streams):
            if parsed.stream:
                return await self._stream(request, parsed, builder, parent)
            results = [StreamResult(i) for i in range(parsed.streams)]
            async for index, msg in self._merged(parsed, parent):
                results[index].absorb(msg)
            return web.json_response(builder.final_body(results))

    async def _stream(
        self, request: web.Request, parsed: ParsedRequest, builder: ResponseBuilder, parent: Context | None
    ) -> web.StreamResponse:
        stream = self._merged(parsed, parent)
        response, messages = await open_event_stream(request, stream)
        results = [StreamResult(i) for i in range(parsed.streams)]
        try:
            if parsed.chat:
                for index in range(parsed.streams):
                    await send_event(response, builder.role_chunk(index))
            async for index, msg in messages:
                if parsed.echo and not results[index].text:  # the prompt goes first, once per choice
                    await send_event(response, builder.echo_chunk(index, msg.prompt_logprobs))
                results[index].absorb(msg)
                await send_event(response, builder.delta_chunk(index, msg))
            if parsed.include_usage:
                await send_event(response, builder.usage_chunk(results))
        except RouterError as exc:  # failed after the 200: report it in the stream, as OpenAI does
            await send_event(response, HttpError.from_router(exc).body())
        except (ConnectionResetError, asyncio.CancelledError):
            await stream.aclose()  # the client left: closing the streams aborts the request on its nodes
            raise
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _merged(
        self, parsed: ParsedRequest, parent: Context | None = None
    ) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
        """Every stream of the request (prompt x candidate), interleaved as messages arrive; seeds differ per stream."""
        queue: asyncio.Queue[tuple[int, pb.GenerateResponse] | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            sampling = pb.SamplingParameters()
            sampling.CopyFrom(parsed.sampling)
            if index and sampling.HasField("seed"):
                sampling.seed = (sampling.seed + index) % 2**64  # seeds are uint64 on the wire
            prompt = parsed.prompts[parsed.prompt_of(index)]
            try:
                async for msg in self.service.generate(prompt, sampling, f"{parsed.id}-{index}", parent):
                    await queue.put((index, msg))
                await queue.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(i)) for i in range(parsed.streams)]
        try:
            done = 0
            while done < parsed.streams:
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
