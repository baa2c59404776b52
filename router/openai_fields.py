"""Which request fields the OpenAI-compatible endpoint honours, and the 400 for every other one.

A client must never get a 200 for a field that changed nothing: an ignored `echo` makes lm-eval score every choice 0,
an ignored `response_format` hands an agent unparsable text. So every field of OpenAI's completions and chat
schemas, and of vLLM's extensions to them, is either in HONOURED for the endpoint (parsed in
router/openai_protocol.py and carried to the engine) or in UNSUPPORTED with its neutral values (some fields are
honoured by one endpoint only, e.g. `echo` and `best_of` by completions): a request may send it only with a value
that asks for nothing (`echo: false`, `logit_bias: {}`, `tools: []`, ...). Any other field name is unknown and refused too, so a
typo (`max_token`) cannot pass silently either. README.md's "Request fields" table lists the same sets
(tests/unit/test_openai_fields.py keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

COMMON_HONOURED = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "user",  # an end-user label for the operator's logs; OpenAI's own use is abuse monitoring
        # vLLM's sampling extensions
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "stop_token_ids",
        "prompt_logprobs",
        "logit_bias",
        # structured output (grammar-constrained sampling), at most one per request
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    }
)
HONOURED: Mapping[str, frozenset[str]] = {
    "completions": COMMON_HONOURED | {"prompt", "echo", "best_of"},
    "chat": COMMON_HONOURED | {"messages", "max_completion_tokens", "top_logprobs"},
}


def _absent(value: Any) -> bool:
    return value is None


def _false(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value in ([], {}, "")


def _one(value: Any) -> bool:
    return value is None or (value == 1 and not isinstance(value, bool))


def _zero(value: Any) -> bool:
    return value is None or (value == 0 and not isinstance(value, bool))


def _true(value: Any) -> bool:
    return value is None or value is True


def _equals(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


# field -> (is the value neutral?, what a neutral value looks like, for the error message)
UNSUPPORTED: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    # OpenAI completions
    "echo": (_false, "false"),
    "suffix": (_empty, 'null or ""'),
    "best_of": (_one, "1"),
    # OpenAI chat
    "tools": (_empty, "[]"),
    "tool_choice": (_equals("none"), '"none"'),
    "parallel_tool_calls": (_absent, "absent"),
    "functions": (_empty, "[]"),
    "function_call": (_equals("none"), '"none"'),
    "audio": (_absent, "null"),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "prediction": (_absent, "null"),
    "reasoning_effort": (_absent, "null"),
    "verbosity": (_absent, "null"),
    "web_search_options": (_absent, "null"),
    "store": (_false, "false"),
    "metadata": (_empty, "{}"),
    "service_tier": (_equals("auto", "default"), '"auto" or "default"'),
    "prompt_cache_key": (_absent, "null"),
    "safety_identifier": (_absent, "null"),
    # vLLM extensions
    "use_beam_search": (_false, "false"),
    "length_penalty": (_one, "1"),
    "min_tokens": (_zero, "0"),
    "include_stop_str_in_output": (_false, "false"),
    "skip_special_tokens": (_true, "true"),
    "spaces_between_special_tokens": (_true, "true"),
    "truncate_prompt_tokens": (_absent, "null"),
    "allowed_token_ids": (_absent, "null"),
    "bad_words": (_empty, "[]"),
    "add_special_tokens": (_absent, "null"),
    "add_generation_prompt": (_true, "true"),
    "continue_final_message": (_false, "false"),
    "chat_template": (_absent, "null"),
    "chat_template_kwargs": (_empty, "{}"),
    "documents": (_empty, "[]"),
    "guided_decoding_backend": (_absent, "null"),
    "guided_whitespace_pattern": (_absent, "null"),
    "structural_tag": (_absent, "null"),
    "logits_processors": (_empty, "[]"),
    "return_tokens_as_token_ids": (_false, "false"),
    "priority": (_zero, "0"),
    "request_id": (_absent, "null"),
    "cache_salt": (_absent, "null"),
    "kv_transfer_params": (_absent, "null"),
    "mm_processor_kwargs": (_empty, "{}"),
    "vllm_xargs": (_empty, "{}"),
}


class UnsupportedField(ValueError):
    """A field this endpoint does not honour, sent with a value that asks for something."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def check_fields(body: Mapping[str, Any], endpoint: str) -> None:
    """Raise UnsupportedField for the first field of body that is neither honoured nor sent at a neutral value."""
    honoured = HONOURED[endpoint]
    for name in body:
        if name in honoured:
            continue
        rule = UNSUPPORTED.get(name)
        if rule is None:
            raise UnsupportedField(name, f"unknown field {name!r}")
        is_neutral, neutral = rule
        if not is_neutral(body[name]):
            raise UnsupportedField(
                name, f"{name} is not supported by this server (send it as {neutral} or leave it out)"
            )
