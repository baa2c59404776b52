"""Hypothesis strategies for hostile inputs to the router, and the senders that judge its answers.

Shared by the fuzz tests (tests/adversarial/test_fuzz_http.py, test_fuzz_grpc.py) and the fuzz benchmark
(benchmarks/fuzz_endpoints.py). A good answer is 2xx or 4xx with an OpenAI-shaped JSON error over HTTP, and OK or a
status naming the client's fault over gRPC; a 5xx, UNKNOWN/INTERNAL or no answer within the client timeout (a hang)
is a finding. Generation stays cheap: no strategy asks for more than MAX_GENERATED tokens per choice.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from hypothesis import strategies as st

from splitserve.v1 import inference_pb2 as pb

MAX_GENERATED = 4
CALL_TIMEOUT_S = 30.0
HTTP_PATHS = ("/v1/completions", "/v1/chat/completions")
GOOD_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_HUGE = "__HUGE__"  # placeholder replaced by a raw number literal json.dumps cannot write


@dataclass(slots=True)
class HttpCase:
    path: str
    content_type: str
    body: bytes


@dataclass
class Tally:
    """Answers per endpoint: sent, 2xx, 4xx, 5xx, hangs; `findings` keeps the first bad cases."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    def add(self, endpoint: str, outcome: str, bad: str | None = None) -> None:
        counter = self.counts.setdefault(endpoint, Counter())
        counter["sent"] += 1
        counter[outcome] += 1
        if bad is not None and len(self.findings) < 20:
            self.findings.append(f"{endpoint}: {bad}")

    def as_dict(self) -> dict[str, dict[str, int]]:
        keys = ("sent", "2xx", "4xx", "5xx", "hangs")
        return {endpoint: {k: counter[k] for k in keys} for endpoint, counter in self.counts.items()}


# ---- values ----------------------------------------------------------------------------------------------------

_ODD_PIECES = [
    "\ud800",
    "\udfff",
    "\x00",
    "\u202e",
    "\ufeff",
    "😀",
    "<s>",
    "</s>",
    "<|im_end|>",
    "{{ x }}",
    "{%",
    "\n",
]
weird_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(_ODD_PIECES), max_size=6).map("".join),
    st.integers(1000, 20000).map(lambda n: "x" * n),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    weird_text,
)
json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)  # fmt: skip
# A length that may generate tokens stays small; the rest are refused before anything runs.
max_tokens_values = st.one_of(
    st.integers(-3, MAX_GENERATED),
    st.integers(2**32 - 2, 2**80),
    st.sampled_from(["4", 4.0, True, [], {}, _HUGE]),
)
_HUGE_LITERALS = ("9" * 5000, "-" + "1" * 4400, "1e99999", "-1e-99999", "18446744073709551616", "4294967296")


def _prompt() -> st.SearchStrategy[Any]:
    ids = st.lists(st.integers(0, 1100), min_size=1, max_size=40)
    return st.one_of(st.text(max_size=120), ids, st.lists(st.text(max_size=20), min_size=1, max_size=2))


def _tool() -> st.SearchStrategy[Any]:
    """A function tool, its parameters a small schema or any JSON (most of which no grammar compiler takes)."""
    schema = st.one_of(
        st.just({"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}), json_values
    )
    function = st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "g", "", "bad name"])}, optional={"parameters": schema}
    )
    return st.fixed_dictionaries({"type": st.just("function"), "function": function})


def _messages() -> st.SearchStrategy[Any]:
    role = st.sampled_from(["system", "user", "assistant", "tool", "nobody"])
    content = st.one_of(
        weird_text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": weird_text}), max_size=2)
    )
    return st.lists(st.fixed_dictionaries({"role": role, "content": content}), min_size=1, max_size=3)


def well_typed(model: str, chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A request a client could mean: right types, values mostly in range."""
    optional: dict[str, st.SearchStrategy[Any]] = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(0, 50),
        "min_p": st.floats(0, 1),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.one_of(
            st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=3)
        ),
        "n": st.integers(1, 3),
        "stream": st.booleans(),
        "ignore_eos": st.booleans(),
        "presence_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }
    if chat:
        optional["logprobs"] = st.booleans()
        optional["tools"] = st.one_of(st.lists(_tool(), max_size=2), json_values)
        optional["tool_choice"] = st.one_of(
            st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]),
            json_values,
        )
        optional["parallel_tool_calls"] = st.one_of(st.booleans(), json_values)
        required = {"messages": _messages(), "max_tokens": st.integers(1, MAX_GENERATED)}
    else:
        optional["logprobs"] = st.integers(0, 5)
        required = {"prompt": _prompt(), "max_tokens": st.integers(1, MAX_GENERATED)}
    return st.fixed_dictionaries({"model": st.just(model), **required}, optional=optional)


_OPTIONAL_FIELDS = ["temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream", "ignore_eos",
                    "presence_penalty", "repetition_penalty", "stream_options"]  # fmt: skip


def ill_typed(model: str, chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A well-typed request with fields replaced by any JSON value (the lengths by small or refused ones)."""
    names = [*_OPTIONAL_FIELDS, "logprobs", "prompt", "messages", "model", "top_logprobs", "max_tokens",
             "max_completion_tokens", "user", "unknown_field"]  # fmt: skip

    def mutate(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        return {**base, **changes}

    value_for = {"max_tokens": max_tokens_values, "max_completion_tokens": max_tokens_values}
    changes = st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: value_for.get(k, json_values) for k in keys})
    )
    return st.builds(mutate, well_typed(model, chat), changes)


def _encode(body: Any) -> str:
    return json.dumps(body)  # ensure_ascii: a lone surrogate travels as a "\ud800" escape


@st.composite
def http_cases(draw: st.DrawFn, model: str) -> HttpCase:
    path = draw(st.sampled_from([*HTTP_PATHS * 4, "/v1/models", "/v1/nothing"]))
    chat = path.endswith("chat/completions")
    content_type = draw(
        st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded", ""])
    )
    kind = draw(st.sampled_from(["good", "good", "ill", "ill", "huge", "deep", "bytes", "encoding"]))
    if kind == "good":
        text = _encode(draw(well_typed(model, chat)))
    elif kind == "ill":
        text = _encode(draw(ill_typed(model, chat)))
    elif kind == "huge":
        body = draw(well_typed(model, chat))
        body[draw(st.sampled_from(["max_tokens", "seed", "top_k", "n", "temperature", "logprobs"]))] = _HUGE
        text = _encode(body)
    elif kind == "deep":
        depth = draw(st.integers(1, 60000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        body = draw(well_typed(model, chat))
        body[draw(st.sampled_from(["prompt", "messages", "stop", "extra"]))] = _HUGE
        text = _encode(body).replace(json.dumps(_HUGE), opener * depth + "1" + closer * depth, 1)
    if kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "encoding":
        base = _encode(draw(well_typed(model, chat)))
        codec = draw(st.sampled_from(["utf-16", "utf-32", "latin-1-surrogate", "truncated", "trailing"]))
        if codec == "latin-1-surrogate":  # raw surrogate bytes: not UTF-8
            raw = base.replace("}", ', "x": "\ud800\u00e9"}', 1).encode("utf-8", "surrogatepass")
        elif codec == "truncated":
            raw = base.encode()[: draw(st.integers(0, max(0, len(base) - 1)))]
        elif codec == "trailing":
            raw = base.encode() + draw(st.binary(min_size=1, max_size=10))
        else:
            raw = base.encode(codec)
    else:
        literal = draw(st.sampled_from(_HUGE_LITERALS))
        raw = text.replace(json.dumps(_HUGE), literal).encode()
    return HttpCase(path, content_type, raw)


# ---- gRPC ----------------------------------------------------------------------------------------------------

# Mostly plausible values (so requests also get through), and any float32 at all.
_f32 = st.one_of(st.floats(0.5, 1.0, width=32), st.floats(width=32, allow_nan=True, allow_infinity=True))


@st.composite
def grpc_requests(draw: st.DrawFn, model: str) -> pb.GenerateRequest:
    """A GenerateRequest with any value its fields' wire types allow (lengths kept small)."""
    request = pb.GenerateRequest(
        model=draw(st.sampled_from(["", "", model, "other-model"])),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=300, max_size=2000))),
    )
    if draw(st.booleans()):
        request.text = draw(st.text(max_size=120))
    else:
        request.token_ids.ids.extend(
            draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 1000), max_size=40))
        )
    sampling = request.sampling
    for name, values in (
        ("max_tokens", st.integers(0, MAX_GENERATED)),
        ("top_k", st.integers(0, 2**32 - 1)),
        ("seed", st.integers(0, 2**64 - 1)),
        ("logprobs", st.integers(0, 2**32 - 1) | st.integers(0, 25)),
        ("temperature", _f32),
        ("top_p", _f32),
        ("min_p", _f32),
        ("repetition_penalty", _f32),
        ("presence_penalty", _f32),
        ("frequency_penalty", _f32),
        ("ignore_eos", st.booleans()),
    ):
        if draw(st.integers(0, 3)) == 0:
            setattr(sampling, name, draw(values))
    if draw(st.integers(0, 4)) == 0:
        sampling.stop.extend(draw(st.lists(st.text(max_size=30), max_size=30)))
    if draw(st.integers(0, 4)) == 0:
        sampling.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=2000)))
    return request


def _cheap_if_decoded(raw: bytes) -> bool:
    """Random bytes that happen to decode must not ask for a long generation."""
    try:
        request = pb.GenerateRequest.FromString(raw)
    except Exception:
        return True
    return not request.sampling.HasField("max_tokens") or request.sampling.max_tokens <= MAX_GENERATED


grpc_raw_bytes = st.binary(max_size=200).filter(_cheap_if_decoded)


def grpc_messages(model: str) -> st.SearchStrategy[bytes | pb.GenerateRequest]:
    """GenerateRequests and raw bytes: weighted 1:2, which hypothesis turns into about 3:1 (it skips repeats)."""
    return st.integers(0, 2).flatmap(lambda kind: grpc_requests(model) if kind == 0 else grpc_raw_bytes)


# ---- senders ---------------------------------------------------------------------------------------------------


async def send_http(session: aiohttp.ClientSession, base_url: str, case: HttpCase, tally: Tally) -> None:
    endpoint = case.path if case.path in HTTP_PATHS else "other paths"
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with session.post(base_url + case.path, data=case.body, headers=headers) as response:
                payload = await response.read()
    except TimeoutError:
        tally.add(endpoint, "hangs", f"no answer in {CALL_TIMEOUT_S} s to {case.body[:200]!r}")
        return
    status = response.status
    if status >= 500:
        tally.add(endpoint, "5xx", f"{status} {payload[:200]!r} for {case.body[:300]!r}")
    elif status >= 400:
        bad = None if _is_openai_error(payload) else f"{status} not OpenAI JSON: {payload[:200]!r}"
        tally.add(endpoint, "4xx", bad)
    else:
        tally.add(endpoint, "2xx")


def _is_openai_error(payload: bytes) -> bool:
    try:
        error = json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


async def send_grpc(channel: grpc.aio.Channel, message: bytes | pb.GenerateRequest, tally: Tally) -> None:
    """One Generate call; raw bytes go through a method without a serializer, past the client's own checks."""
    endpoint = "Generate (raw bytes)" if isinstance(message, bytes) else "Generate"
    method = channel.unary_stream(
        "/splitserve.v1.Inference/Generate",
        request_serializer=None if isinstance(message, bytes) else pb.GenerateRequest.SerializeToString,
    )
    code = grpc.StatusCode.OK
    details = ""
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S + 5):
            async for _ in method(message, timeout=CALL_TIMEOUT_S):
                pass
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    except TimeoutError:
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    shown = message[:120] if isinstance(message, bytes) else str(message)[:300]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        tally.add(endpoint, "hangs", f"no answer in {CALL_TIMEOUT_S} s to {shown!r}")
    elif code == grpc.StatusCode.OK:
        tally.add(endpoint, "2xx")
    elif code in GOOD_GRPC:
        tally.add(endpoint, "4xx")
    else:
        tally.add(endpoint, "5xx", f"{code.name} {details[:200]!r} for {shown!r}")
