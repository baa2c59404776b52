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

from collections.abc import Callable, Mapping, Set
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
    "chat": COMMON_HONOURED
    | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"},
}


def absent(value: Any) -> bool:
    return value is None


def false_or_absent(value: Any) -> bool:
    return value is None or value is False


def empty_or_absent(value: Any) -> bool:
    return value is None or value in ([], {}, "")


def one_or_absent(value: Any) -> bool:
    return value is None or (value == 1 and not isinstance(value, bool))


def zero_or_absent(value: Any) -> bool:
    return value is None or (value == 0 and not isinstance(value, bool))


def true_or_absent(value: Any) -> bool:
    return value is None or value is True


def absent_or_one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in allowed


# (is the value neutral?, what a neutral value looks like, for the error message)
NeutralRule = tuple[Callable[[Any], bool], str]
UNSUPPORTED: Mapping[str, NeutralRule] = {
    # OpenAI completions
    "echo": (false_or_absent, "false"),
    "suffix": (empty_or_absent, 'null or ""'),
    "best_of": (one_or_absent, "1"),
    # OpenAI chat (tool calling is honoured by chat: a completions request cannot carry it)
    "tools": (empty_or_absent, "[]"),
    "tool_choice": (absent_or_one_of("none"), '"none"'),
    "parallel_tool_calls": (absent, "absent"),
    "functions": (empty_or_absent, "[]"),
    "function_call": (absent_or_one_of("none"), '"none"'),
    "audio": (absent, "null"),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "prediction": (absent, "null"),
    "reasoning_effort": (absent, "null"),
    "verbosity": (absent, "null"),
    "web_search_options": (absent, "null"),
    "store": (false_or_absent, "false"),
    "metadata": (empty_or_absent, "{}"),
    "service_tier": (absent_or_one_of("auto", "default"), '"auto" or "default"'),
    "prompt_cache_key": (absent, "null"),
    "safety_identifier": (absent, "null"),
    # vLLM extensions
    "use_beam_search": (false_or_absent, "false"),
    "length_penalty": (one_or_absent, "1"),
    "min_tokens": (zero_or_absent, "0"),
    "include_stop_str_in_output": (false_or_absent, "false"),
    "skip_special_tokens": (true_or_absent, "true"),
    "spaces_between_special_tokens": (true_or_absent, "true"),
    "truncate_prompt_tokens": (absent, "null"),
    "allowed_token_ids": (absent, "null"),
    "bad_words": (empty_or_absent, "[]"),
    "add_special_tokens": (absent, "null"),
    "add_generation_prompt": (true_or_absent, "true"),
    "continue_final_message": (false_or_absent, "false"),
    "chat_template": (absent, "null"),
    "chat_template_kwargs": (empty_or_absent, "{}"),
    "documents": (empty_or_absent, "[]"),
    "guided_decoding_backend": (absent, "null"),
    "guided_whitespace_pattern": (absent, "null"),
    "structural_tag": (absent, "null"),
    "logits_processors": (empty_or_absent, "[]"),
    "return_tokens_as_token_ids": (false_or_absent, "false"),
    "priority": (zero_or_absent, "0"),
    "request_id": (absent, "null"),
    "cache_salt": (absent, "null"),
    "kv_transfer_params": (absent, "null"),
    "mm_processor_kwargs": (empty_or_absent, "{}"),
    "vllm_xargs": (empty_or_absent, "{}"),
}


class UnsupportedField(ValueError):
    """A field this endpoint does not honour, sent with a value that asks for something."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def check_fields(body: Mapping[str, Any], endpoint: str) -> None:
    """Raise UnsupportedField for the first field of body that is neither honoured nor sent at a neutral value."""
    refuse_unhonoured(body, HONOURED[endpoint], UNSUPPORTED)


def refuse_unhonoured(
    body: Mapping[str, Any],
    honoured: Set[str],
    unsupported: Mapping[str, NeutralRule],
) -> None:
    """check_fields over any endpoint's tables (router/responses_api.py has its own)."""
    for name in body:
        if name in honoured:
            continue
        rule = unsupported.get(name)
        if rule is None:
            raise UnsupportedField(name, f"unknown field {name!r}")
        is_neutral, neutral = rule
        if not is_neutral(body[name]):
            raise UnsupportedField(
                name, f"{name} is not supported by this server (send it as {neutral} or leave it out)"
            )
