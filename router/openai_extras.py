"""The HTTP endpoints around inference that clients and load testers probe, in vLLM's shapes.

  GET  /health              200 with an empty body while the process serves (GuideLLM and vLLM clients probe it;
                            /readyz says whether requests can be served)
  GET  /version             {"version": <splitserve's package version>}
  GET  /v1/models/{id}      the served model's entry, or 404 in OpenAI's shape
  POST /tokenize            {"model"?, "prompt": str} or {"model"?, "messages": [...], "add_generation_prompt"?}
                            -> {"count", "max_model_len", "tokens"} (+ "token_strs" with "return_token_strs": true)
  POST /detokenize          {"model"?, "tokens": [ids]} -> {"prompt": text}
Tokenizing runs on the router's prompt encoder (router/prompt_encoder.py), so a huge text never blocks the loop.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiohttp import web

from router.http_body import MAX_BODY_BYTES, read_json
from router.http_error import HttpError
from router.prompt_encoder import PromptEncoder, PromptTooLong

_TOKENIZE_FIELDS = {
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "return_token_strs",
}
_DETOKENIZE_FIELDS = {"model", "tokens"}


def package_version() -> str:
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class ExtraEndpoints:
    def __init__(
        self, model: str, encoder: PromptEncoder, max_model_len: int, vocab_size: int, body_timeout_s: float
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.body_timeout_s = body_timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models/{model_id:.+}", self.model_entry)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "object": "model",
            "created": 0,
            "owned_by": "splitserve",
            "max_model_len": self.max_model_len,
        }

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": package_version()})

    async def model_entry(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.model:
            raise HttpError(
                404,
                f"the model {model_id!r} does not exist (served: {self.model!r})",
                param="model",
                code="model_not_found",
            )
        return web.json_response(self.model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request, _TOKENIZE_FIELDS)
        has_prompt, has_messages = "prompt" in body, "messages" in body
        if has_prompt == has_messages:
            raise HttpError(400, "send exactly one of prompt and messages", param="prompt")
        try:
            if has_prompt:
                prompt = body["prompt"]
                if not isinstance(prompt, str):
                    raise HttpError(400, "prompt must be a string", param="prompt")
                add_special = _flag(body, "add_special_tokens", True)
                ids = await self.encoder.encode(prompt, add_special_tokens=add_special, limit=None)
            else:
                ids = await self._chat_ids(body)
        except PromptTooLong as exc:  # only with a limit, which tokenize does not set; kept for safety
            raise HttpError(400, str(exc), param="prompt") from exc
        answer: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if _flag(body, "return_token_strs", False):
            answer["token_strs"] = self.encoder.tokenizer.convert_ids_to_tokens(ids)
        return web.json_response(answer)

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request, _DETOKENIZE_FIELDS)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in tokens
        ):
            raise HttpError(
                400, f"tokens must be a list of token ids in [0, {self.vocab_size})", param="tokens"
            )
        text = await self.encoder.run(self.encoder.tokenizer.decode, tokens)
        return web.json_response({"prompt": text})

    async def _body(self, request: web.Request, fields: set[str]) -> dict[str, Any]:
        body = await read_json(request, MAX_BODY_BYTES, self.body_timeout_s)
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        for name in body:
            if name not in fields:
                raise HttpError(400, f"unknown field {name!r}", param=name)
        model = body.get("model")
        if model is not None and model != self.model:
            raise HttpError(
                404,
                f"the model {model!r} does not exist (served: {self.model!r})",
                param="model",
                code="model_not_found",
            )
        return body

    async def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise HttpError(
                400,
                "messages must be a list of {role, content} objects with string content",
                param="messages",
            )
        add_generation_prompt = _flag(body, "add_generation_prompt", True)
        tokenizer = self.encoder.tokenizer
        try:
            rendered = await self.encoder.run(
                lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            )
        except Exception as exc:  # the model's own template rejected the conversation
            raise HttpError(400, f"messages: {exc}", param="messages") from exc
        # The rendered conversation holds any BOS its template emits.
        return await self.encoder.encode(rendered, add_special_tokens=False)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise HttpError(400, f"{name} must be a boolean", param=name)
    return value
