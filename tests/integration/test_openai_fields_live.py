"""Every honoured field of the README's table, sent by the openai client to a live split cluster, changes the output
as the table says (the refused ones are tests/integration/test_openai_conformance.py's).

One check per field, registered under its name; a field added to router/openai_fields.py without a check here
fails `test_every_honoured_field_has_a_check`. The model is a random tiny one, so checks compare against the
same cluster's greedy output instead of expected text: top_k 1, top_p near 0 and min_p 1 must give back the greedy
answer at temperature 1; penalties must change a greedy answer that repeats itself; and so on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import transformers

from engine.tokenizer import Tokenizer
from ops.launcher import ClusterSpec, LocalCluster
from router.openai_fields import HONOURED

pytestmark = pytest.mark.timeout(300)
PROMPT = "The cluster"
TOKENS = 12


@dataclass
class Live:
    client: openai.OpenAI
    model: str
    tokenizer: Tokenizer
    model_dir: Path

    def complete(self, **fields: Any) -> Any:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **fields}
        return self.client.completions.create(**body)

    def text(self, **fields: Any) -> str:
        return str(self.complete(**fields).choices[0].text)

    def chat(self, **fields: Any) -> Any:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": TOKENS,
                "temperature": 0, **fields}  # fmt: skip
        return self.client.chat.completions.create(**body)

    def vllm(self, **fields: Any) -> dict[str, Any]:
        return {"extra_body": fields}  # vLLM's fields travel in the body, beside OpenAI's

    def token(self, text: str) -> int:
        return self.tokenizer.encode(text, add_special_tokens=False)[0]


CHECKS: dict[str, Callable[[Live], None]] = {}


def honours(*names: str) -> Callable[[Callable[[Live], None]], Callable[[Live], None]]:
    def register(check: Callable[[Live], None]) -> Callable[[Live], None]:
        for name in names:
            CHECKS[name] = check
        return check

    return register


@pytest.fixture(scope="module")
def live(llama_dir: Path) -> Iterator[Live]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    with LocalCluster(spec) as cluster:
        client = openai.OpenAI(
            base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0, timeout=120
        )
        yield Live(client, llama_dir.name, Tokenizer.from_dir(llama_dir), llama_dir)


# ---- the prompt and the model -----------------------------------------------------------------------------------


@honours("model")
def _model(live: Live) -> None:
    with pytest.raises(openai.NotFoundError):
        live.complete(model="another-model")


@honours("prompt")
def _prompt(live: Live) -> None:
    ids = live.tokenizer.encode(PROMPT)
    assert live.text(prompt=ids) == live.text()  # token ids are the same prompt
    batch = live.complete(prompt=[PROMPT, "Another prompt"], n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == live.text() != batch.choices[2].text


@honours("messages")
def _messages(live: Live) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = live.chat(messages=messages)
    hf = transformers.AutoTokenizer.from_pretrained(live.model_dir)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(hf(text, add_special_tokens=False)["input_ids"])


@honours("echo")
def _echo(live: Live) -> None:
    assert live.text(echo=True) == PROMPT + live.text()


@honours("user")
def _user(live: Live) -> None:
    assert live.text(user="alice") == live.text()  # a label for logs: accepted, changes nothing


# ---- length and stopping ----------------------------------------------------------------------------------------


@honours("max_tokens", "ignore_eos")
def _max_tokens(live: Live) -> None:
    eos = live.tokenizer.eos_token_id
    assert eos is not None
    ends_at_once = live.complete(max_tokens=5, logit_bias={str(eos): 100})
    assert ends_at_once.choices[0].finish_reason == "stop" and ends_at_once.usage.completion_tokens == 1
    out = live.complete(max_tokens=5, logit_bias={str(eos): 100}, **live.vllm(ignore_eos=True))
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


@honours("max_completion_tokens")
def _max_completion_tokens(live: Live) -> None:
    out = live.chat(max_completion_tokens=3, **live.vllm(ignore_eos=True))
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


@honours("stop")
def _stop(live: Live) -> None:
    greedy = live.text()
    stop = greedy.strip()[2:5]
    assert stop
    out = live.complete(stop=[stop])
    assert out.choices[0].text == greedy[: greedy.index(stop)] and out.choices[0].finish_reason == "stop"


@honours("stop_token_ids", "logit_bias")
def _stop_token_ids(live: Live) -> None:
    target = live.token(" cache")
    forced = live.complete(max_tokens=4, logit_bias={str(target): 100})
    assert forced.choices[0].text == live.tokenizer.decode([target] * 4)
    stopped = live.complete(max_tokens=4, logit_bias={str(target): 100}, **live.vllm(stop_token_ids=[target]))
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


# ---- sampling -----------------------------------------------------------------------------------------------------


def _sampled(live: Live, seed: int, **fields: Any) -> str:
    return live.text(temperature=1.0, seed=seed, **fields)


@honours("temperature", "seed")
def _temperature_and_seed(live: Live) -> None:
    greedy = live.text()
    assert live.text() == greedy  # temperature 0 is greedy: the same every time
    samples = [_sampled(live, seed) for seed in (1, 2)]
    assert _sampled(live, 1) == samples[0]  # a seed repeats its sample
    assert samples[0] != samples[1] and greedy not in samples  # the model is random: its samples differ


@honours("top_k", "top_p", "min_p")
def _truncation(live: Live) -> None:
    greedy, seed = live.text(), 3
    assert _sampled(live, seed) != greedy
    assert _sampled(live, seed, **live.vllm(top_k=1)) == greedy
    assert _sampled(live, seed, top_p=1e-6) == greedy
    assert _sampled(live, seed, **live.vllm(min_p=1.0)) == greedy


@honours("presence_penalty", "frequency_penalty", "repetition_penalty")
def _penalties(live: Live) -> None:
    long = {"max_tokens": 24, "logprobs": 0}
    greedy = live.complete(**long).choices[0]
    tokens = greedy.logprobs.tokens
    assert len(set(tokens)) < len(tokens), "the greedy answer must repeat a token for penalties to matter"
    for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, live.vllm(repetition_penalty=2.0)):
        assert live.complete(**long, **fields).choices[0].text != greedy.text, fields


@honours("n")
def _n(live: Live) -> None:
    out = live.complete(n=3, temperature=1.0, seed=4)
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) > 1


@honours("best_of")
def _best_of(live: Live) -> None:
    candidates = live.complete(n=3, temperature=1.0, seed=9, logprobs=0).choices
    totals = {c.text: sum(c.logprobs.token_logprobs) for c in candidates}
    best = live.complete(n=1, best_of=3, temperature=1.0, seed=9).choices
    assert len(best) == 1 and best[0].text == max(totals, key=lambda text: totals[text])


# ---- logprobs -----------------------------------------------------------------------------------------------------


@honours("logprobs")
def _logprobs(live: Live) -> None:
    out = live.complete(logprobs=3).choices[0].logprobs
    assert len(out.tokens) == TOKENS and all(len(top) == 3 for top in out.top_logprobs)
    assert all(lp <= 0 for lp in out.token_logprobs)
    chat = live.chat(logprobs=True).choices[0].logprobs
    assert chat is not None and len(chat.content) == TOKENS


@honours("top_logprobs")
def _top_logprobs(live: Live) -> None:
    chat = live.chat(logprobs=True, top_logprobs=2).choices[0].logprobs
    assert chat is not None and all(len(entry.top_logprobs) == 2 for entry in chat.content)


@honours("prompt_logprobs")
def _prompt_logprobs(live: Live) -> None:
    prompt = live.tokenizer.encode(PROMPT)
    entries = live.complete(**live.vllm(prompt_logprobs=1)).choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    assert all(str(token) in entry for token, entry in zip(prompt[1:], entries[1:], strict=True))


# ---- streaming ----------------------------------------------------------------------------------------------------


@honours("stream", "stream_options")
def _stream(live: Live) -> None:
    chunks = list(live.complete(stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == live.text()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS


# ---- structured output --------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@honours("response_format")
def _response_format(live: Live) -> None:
    # Any object: a random model's strings may run on, so "}" is favoured; the grammar still puts "{" first.
    close = {str(live.token("}")): 50}
    out = live.chat(max_tokens=200, response_format={"type": "json_object"}, logit_bias=close)
    assert json.loads(out.choices[0].message.content) == {}
    assert live.chat(max_tokens=3, logit_bias=close).choices[0].message.content.startswith("}")
    strict = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    out = live.chat(max_tokens=200, response_format=strict).choices[0].message.content
    assert set(json.loads(out)) == {"ok"}


@honours("guided_json", "guided_regex", "guided_choice", "guided_grammar")
def _guided(live: Live) -> None:
    assert set(json.loads(live.text(max_tokens=200, **live.vllm(guided_json=SCHEMA)))) == {"ok"}
    assert re.fullmatch(
        r"[0-9]{3}-[a-z]{2}", live.text(max_tokens=200, **live.vllm(guided_regex=r"[0-9]{3}-[a-z]{2}"))
    )
    assert live.text(max_tokens=200, **live.vllm(guided_choice=["alpha", "beta"])) in ("alpha", "beta")
    assert live.text(max_tokens=200, **live.vllm(guided_grammar='root ::= "yes" | "no"')) in ("yes", "no")


# ---- tools --------------------------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


@honours("tools", "tool_choice", "parallel_tool_calls")
def _tools(live: Live) -> None:
    forced = live.chat(max_tokens=200, tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    [call] = forced.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"ok"}
    hidden = live.chat(tools=[TOOL], tool_choice="none")
    assert hidden.choices[0].message.tool_calls is None
    assert hidden.usage.prompt_tokens < live.chat(tools=[TOOL]).usage.prompt_tokens  # auto shows the tools


# ---- the tests (last: the checks above must be registered when the parametrization is read) -----------------------


def test_every_honoured_field_has_a_check() -> None:
    assert set(CHECKS) == HONOURED["completions"] | HONOURED["chat"]


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_an_honoured_field_does_what_the_table_says(live: Live, name: str) -> None:
    CHECKS[name](live)
