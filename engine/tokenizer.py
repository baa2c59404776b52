"""The engine's tokenizer: a Hugging Face checkpoint's tokenizer.json, read with `tokenizers`, plus its chat template.

It reproduces what transformers 5's `AutoTokenizer` does for fast (tokenizer.json) tokenizers without importing
transformers: encoding uses tokenizer.json's own post-processor for BOS/EOS (transformers 5 ignores
`add_bos_token` when a tokenizer.json exists), special tokens come from tokenizer_config.json (or the legacy
special_tokens_map.json), and chat templates render in a sandboxed Jinja environment configured like transformers'.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from engine.errors import InvalidRequestError, ModelLoadError

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers copies a message's reasoning under all these names, so templates that read any of them work.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' clean_up_tokenization: meant for WordPiece; transformers skips it for BPE models, and so do we.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


class Tokenizer:
    """Encode, decode and chat-format text for one model; build it with `Tokenizer.from_dir`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str | None],
        chat_template: str | None = None,
        generation_eos_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        source: str = "tokenizer",
    ) -> None:
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v}
        self._add_missing_special_tokens()
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self.chat_template = chat_template
        self._compiled_template = _compile_template(chat_template, source) if chat_template else None
        eos_ids = set(generation_eos_ids)
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        named_ids = {self._backend.token_to_id(t) for t in self._special_tokens.values()}
        added_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self.special_token_ids: frozenset[int] = frozenset(i for i in named_ids | added_ids if i is not None)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json and the JSON files beside it; raise ModelLoadError naming a missing or bad file."""
        model_dir = Path(model_dir)
        backend = _load_backend(model_dir / "tokenizer.json")
        config = _read_json(model_dir / "tokenizer_config.json")
        special_tokens = {name: _token_content(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        if "added_tokens_decoder" not in config:
            # Old checkpoints keep the special tokens in a separate file; tokenizer_config.json still wins.
            legacy = _read_json(model_dir / "special_tokens_map.json")
            for name in _NAMED_SPECIAL_TOKENS:
                special_tokens[name] = special_tokens[name] or _token_content(legacy.get(name))
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True
        generation = _read_json(model_dir / "generation_config.json")
        return cls(
            backend,
            special_tokens,
            chat_template=_find_chat_template(model_dir, config),
            generation_eos_ids=_int_list(generation.get("eos_token_id")),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            source=str(model_dir),
        )

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (the model's may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS; `eos_token_ids` adds generation_config's (e.g. end-of-turn tokens)."""
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def backend(self) -> BackendTokenizer:
        return self._backend

    # --------------------------------------------------------------------------------------------------- methods

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens applies tokenizer.json's post-processor (e.g. Llama's BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the tokenizer's vocabulary (padded embedding rows) decode to nothing."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary entries (not text) of `ids`; None for ids the tokenizer does not have, as transformers does."""
        return [self._backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """Render the conversation with the model's chat template, as transformers' apply_chat_template(tokenize=False).

        The result already holds any BOS the template emits, so encode it with add_special_tokens=False.
        Raises InvalidRequestError when the model has no template, the conversation is empty (transformers refuses
        that too) or the template rejects it.
        """
        if self._compiled_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        if not messages:
            raise InvalidRequestError("the conversation is empty: send at least one message")
        for message in messages:
            if not isinstance(message, dict):
                raise InvalidRequestError(f"chat messages must be objects, got {message!r}")
        variables: dict[str, Any] = {
            "tools": None,
            "documents": None,
            **self._special_tokens,
            **template_vars,
        }
        try:
            return self._compiled_template.render(
                messages=_alias_reasoning_fields(messages),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the conversation: {exc}") from exc

    # --------------------------------------------------------------------------------------------------- helpers

    def _named_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return self._backend.token_to_id(token) if token else None

    def _add_missing_special_tokens(self) -> None:
        # transformers adds a named special token that tokenizer.json lacks as a new special token; so do we.
        missing = [t for t in self._special_tokens.values() if self._backend.token_to_id(t) is None]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


# ------------------------------------------------------------------------------------------------------ loading


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (the engine needs a fast tokenizer's tokenizer.json)")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from exc


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file: {} when absent, ModelLoadError when present but unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object) -> str | None:
    # Special tokens are saved either as plain strings or as serialized AddedToken objects.
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _int_list(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    # transformers 5 saves the template as chat_template.jinja, which takes priority over tokenizer_config.json's.
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: unreadable ({exc})") from exc
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _clean_up_tokenization(text: str) -> str:
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


# -------------------------------------------------------------------------------------------------- chat template


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used for assistant masks in training) and renders the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers' override: jinja's own tojson HTML-escapes, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(template: str, source: str) -> jinja2.Template:
    # Chat templates come with downloaded checkpoints: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"{source}: chat template is not valid Jinja ({exc})") from exc


def _alias_reasoning_fields(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aliased = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased
