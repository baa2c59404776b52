"""Structured outputs in the engine (xgrammar): on a random tiny model, which would otherwise babble, every sampled
output parses and validates against its JSON schema, matches its regex or is one of its choices; bad constraints are
InvalidRequestError; the grammar's state survives a hand-over from a prefill engine to a decode engine and a resumed
request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from engine.config import EngineConfig, EngineRole
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from engine.structured_output import GrammarCompiler
from engine.structured_spec import StructuredKind, StructuredOutput

# Bounded in size (maxLength, maxItems, enums, integer ranges), so a random model finishes well within MAX_TOKENS.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
MATRIX = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "items": {"type": "array", "items": {"enum": [0, 1, 2]}, "minItems": 1, "maxItems": 3},
            "minItems": 1,
            "maxItems": 3,
        },
        "kind": {"enum": ["dense", "sparse"]},
    },
    "required": ["rows", "kind"],
    "additionalProperties": False,
}
MAX_TOKENS = 200
PROMPT = "Describe one user as JSON:"


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(
        llama_dir, EngineConfig(dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=32)
    )


def constrained(spec: StructuredOutput, seed: int, **overrides: object) -> SamplingParams:
    values: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed, **overrides}
    return SamplingParams(structured=spec, **values)  # type: ignore[arg-type]


def schema_spec(schema: dict) -> StructuredOutput:
    return StructuredOutput(StructuredKind.JSON_SCHEMA, text=json.dumps(schema))


@pytest.mark.parametrize("schema", [PERSON, MATRIX], ids=["person", "matrix"])
def test_every_sampled_output_validates_against_its_schema(engine: LLMEngine, schema: dict) -> None:
    results = engine.generate([PROMPT] * 12, [constrained(schema_spec(schema), seed) for seed in range(12)])
    texts = set()
    for result in results:
        assert result.finish_reason == FinishReason.STOP, result.text  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(result.text), schema)
        texts.add(result.text)
    assert len(texts) > 1  # sampled, not one forced string


def test_json_object_gives_an_object(engine: LLMEngine) -> None:
    spec = StructuredOutput(StructuredKind.JSON_OBJECT)
    # A free-form object may nest without bound: count on max_tokens only to end the ones that ramble.
    results = engine.generate([PROMPT] * 6, [constrained(spec, seed, temperature=0.3) for seed in range(6)])
    finished = [r for r in results if r.finish_reason == FinishReason.STOP]
    assert finished
    for result in finished:
        assert isinstance(json.loads(result.text), dict)


def test_regex_choice_and_grammar_outputs_match(engine: LLMEngine) -> None:
    pattern = r"[a-z]{2,6}-[0-9]{2}(\.[A-Z])?"
    choices = ("red", "green", 'blue, or "navy"')
    grammar = 'root ::= "yes" | "no" | ("maybe " [0-9])'
    specs = [
        StructuredOutput(StructuredKind.REGEX, text=pattern),
        StructuredOutput(StructuredKind.CHOICE, choices=choices),
        StructuredOutput(StructuredKind.GRAMMAR, text=grammar),
    ]
    params = [constrained(spec, seed) for spec in specs for seed in range(8)]
    results = engine.generate([PROMPT] * len(params), params)
    for i, result in enumerate(results):
        assert result.finish_reason == FinishReason.STOP, result.text
        kind = i // 8
        if kind == 0:
            assert re.fullmatch(pattern, result.text), result.text
        elif kind == 1:
            assert result.text in choices
        else:
            assert re.fullmatch(r"yes|no|maybe [0-9]", result.text), result.text
    assert len({r.text for r in results[8:16]}) > 1


def test_unconstrained_rows_in_the_same_batch_are_untouched(engine: LLMEngine) -> None:
    free = SamplingParams(max_tokens=12, temperature=0.0)
    alone = engine.generate([PROMPT], free)[0]
    mixed = engine.generate([PROMPT, PROMPT], [free, constrained(schema_spec(MATRIX), 1)])
    assert mixed[0].token_ids == alone.token_ids


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (StructuredOutput(StructuredKind.JSON_SCHEMA, text='{"type": "no-such-type"}'), "json_schema"),
        (StructuredOutput(StructuredKind.JSON_SCHEMA, text="{not json"), "json_schema"),
        (StructuredOutput(StructuredKind.REGEX, text="[a-z"), "regex"),
        (StructuredOutput(StructuredKind.GRAMMAR, text="root ::= undefined_rule"), "grammar"),
        (StructuredOutput(StructuredKind.CHOICE, choices=()), "choice"),
    ],
)
def test_a_bad_constraint_is_an_invalid_request_naming_it(
    engine: LLMEngine, spec: StructuredOutput, named: str
) -> None:
    with pytest.raises(InvalidRequestError, match=named):
        engine.add_request("bad", PROMPT, SamplingParams(structured=spec))
    assert not engine.has_unfinished()


def test_a_resumed_request_continues_its_grammar(engine: LLMEngine) -> None:
    """Prior output replayed into a fresh matcher: the continuation is the uninterrupted one (seeded draws)."""
    params = constrained(schema_spec(PERSON), 5)
    whole = engine.generate([PROMPT], params)[0]
    cut = len(whole.token_ids) // 2
    engine.add_request(
        "resumed", PROMPT, constrained(schema_spec(PERSON), 5), prior_output=whole.token_ids[:cut]
    )
    rest = _run(engine, "resumed")
    assert whole.token_ids[:cut] + rest == whole.token_ids
    with pytest.raises(InvalidRequestError, match="breaks the constraint"):
        broken = engine.tokenizer.encode("nope", add_special_tokens=False)
        engine.add_request("broken", PROMPT, constrained(schema_spec(PERSON), 5), prior_output=broken)


def test_a_decode_engine_continues_from_the_prefill_engines_first_token(llama_dir: Path) -> None:
    config = dict(dtype="float32", block_size=16, num_kv_blocks=64)
    colocated = LLMEngine(llama_dir, EngineConfig(**config))  # type: ignore[arg-type]
    prefill = LLMEngine(llama_dir, EngineConfig(role=EngineRole.PREFILL, **config))  # type: ignore[arg-type]
    decode = LLMEngine(llama_dir, EngineConfig(role=EngineRole.DECODE, **config))  # type: ignore[arg-type]
    for seed in range(4):
        params = constrained(schema_spec(MATRIX), seed)
        expected = colocated.generate([PROMPT], params)[0]
        rid = f"split-{seed}"
        prompt_ids = prefill.tokenizer.encode(PROMPT)
        dst = decode.reserve(rid, prompt_ids, constrained(schema_spec(MATRIX), seed))
        prefill.add_request(rid, prompt_ids, constrained(schema_spec(MATRIX), seed))
        handed = [o for o in _outputs(prefill) if o.request_id == rid][-1]
        assert handed.kv is not None
        src = torch.tensor(handed.kv.block_ids, dtype=torch.long)
        for layer, cache in enumerate(prefill.kv_layers):  # what the KV transport does, in one piece
            decode.kv_layers[layer][torch.tensor(dst, dtype=torch.long)] = cache[src]
        prefill.release(rid)
        decode.admit(rid, handed.kv.first_token_id)  # its output (the first token) comes with the next step
        assert _run(decode, rid) == expected.token_ids
        jsonschema.validate(json.loads(expected.text), MATRIX)


def test_ids_beyond_the_tokenizer_are_never_allowed(llama_dir: Path, engine: LLMEngine) -> None:
    """A model whose vocab_size exceeds its tokenizer's (padded embedding rows): the padding is masked."""
    import xgrammar

    tokenizer = engine.tokenizer
    padded = tokenizer.vocab_size + 100
    compiler = GrammarCompiler(tokenizer, padded, engine.eos_token_ids)
    state = compiler.matcher_for(StructuredOutput(StructuredKind.REGEX, text=".{1,5}"))
    bitmask = xgrammar.allocate_token_bitmask(1, padded)
    state.fill(bitmask, 0)
    logits = torch.zeros(1, padded)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and max(allowed) < tokenizer.vocab_size
    assert not set(allowed) & set(tokenizer.special_token_ids)  # special tokens are not text


def _outputs(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        assert not engine.take_failures()
    return outs


def _run(engine: LLMEngine, rid: str) -> list[int]:
    return [t for out in _outputs(engine) if out.request_id == rid for t in out.new_token_ids]
