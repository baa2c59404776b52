"""What a request's structured-output constraint asks for, checked for shape without compiling it.

The router and every node check the same things here (the module is torch- and xgrammar-free, like
engine/sampling_params.py, so the router can import it): a known kind, text within engine/limits.py's bounds, a JSON
schema that is JSON. Whether a schema, regex or grammar compiles is for the engine's compiler to say
(engine/structured_output.py); its error names the kind too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from engine import limits
from engine.errors import InvalidRequestError


class StructuredKind(StrEnum):
    JSON_SCHEMA = "json_schema"  # text: a JSON Schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object (OpenAI's response_format json_object); no text
    REGEX = "regex"  # text: a regular expression the whole output must match
    CHOICE = "choice"  # choices: the output is exactly one of them
    GRAMMAR = "grammar"  # text: an EBNF grammar (xgrammar's dialect, rule `root` first)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Constrains a request's output; it also keys the engine's cache of compiled grammars, hence frozen."""

    kind: StructuredKind
    text: str = ""
    choices: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the kind when the constraint is malformed."""
        if not isinstance(self.kind, StructuredKind):
            kinds = ", ".join(k.value for k in StructuredKind)
            raise InvalidRequestError(f"structured output kind must be one of {kinds}, got {self.kind!r}")
        name = self.kind.value
        if not isinstance(self.text, str):
            raise InvalidRequestError(f"{name} must be a string, got {type(self.text).__name__}")
        if len(self.text) > limits.MAX_STRUCTURED_OUTPUT_CHARS:
            raise InvalidRequestError(
                f"{name}: at most {limits.MAX_STRUCTURED_OUTPUT_CHARS} characters, got {len(self.text)}"
            )
        if self.kind == StructuredKind.CHOICE:
            _check_choices(self.choices)
        elif self.choices:
            raise InvalidRequestError(f"{name} takes no choices")
        if self.kind == StructuredKind.JSON_OBJECT:
            if self.text:
                raise InvalidRequestError("json_object takes no schema: use json_schema")
        elif self.kind != StructuredKind.CHOICE and not self.text:
            raise InvalidRequestError(f"{name} must not be empty")
        if self.kind == StructuredKind.JSON_SCHEMA:
            _check_schema_text(self.text)


def _check_choices(choices: object) -> None:
    if not isinstance(choices, tuple) or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("choice must be a list of strings")
    if not choices:
        raise InvalidRequestError("choice must list at least one string")
    if len(choices) > limits.MAX_STRUCTURED_CHOICES:
        raise InvalidRequestError(
            f"choice: at most {limits.MAX_STRUCTURED_CHOICES} strings, got {len(choices)}"
        )
    total = sum(len(c) for c in choices)
    if total > limits.MAX_STRUCTURED_OUTPUT_CHARS:
        raise InvalidRequestError(
            f"choice: at most {limits.MAX_STRUCTURED_OUTPUT_CHARS} characters in all, got {total}"
        )
    if any(not c for c in choices):
        raise InvalidRequestError("choice: the strings must not be empty")


def _check_schema_text(text: str) -> None:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(f"json_schema must be a JSON object, got {type(schema).__name__}")
