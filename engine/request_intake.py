"""Turns a request as a caller gives it (id, prompt text or ids, sampling parameters, prior output) into a Sequence,
refusing anything the engine cannot serve with an InvalidRequestError that names the problem."""

from __future__ import annotations

from collections.abc import Iterable

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.limits import MAX_ENGINE_REQUEST_ID_CHARS
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer


class RequestIntake:
    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        max_seq_tokens: int,
        limit_name: str,
        stop_token_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_tokens = max_seq_tokens  # a sequence's prompt plus output never exceeds it
        self.limit_name = limit_name  # what max_seq_tokens is, for messages: "context" or "KV cache capacity"
        # Structured outputs: their grammars end with these tokens (the engine's EOS ids).
        self.grammars = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)

    def new_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prior_output: list[int] | None = None,
    ) -> Sequence:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        if len(request_id) > MAX_ENGINE_REQUEST_ID_CHARS:
            raise InvalidRequestError(
                f"request_id may have at most {MAX_ENGINE_REQUEST_ID_CHARS} characters, got {len(request_id)}"
            )
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        outside = [t for t in params.logit_bias if t >= self.vocab_size]
        if outside:
            raise InvalidRequestError(
                f"logit_bias: token id {outside[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        token_ids = self.tokenize(prompt)
        prior = self.tokenize(prior_output) if prior_output else []
        if len(token_ids) >= self.max_seq_tokens:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the model's {self.limit_name} is {self.max_seq_tokens} "
                "tokens and at least one must be left to generate"
            )
        if prior and (len(token_ids) + len(prior) >= self.max_seq_tokens or len(prior) >= params.max_tokens):
            raise InvalidRequestError(f"{len(prior)} tokens already generated leave nothing to generate")
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            # Resumed requests decode on from the text already delivered, so deltas continue it seamlessly.
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids + prior),
        )
        # Outputs already delivered: they count for max_tokens, penalties and seeded draws.
        for token in prior:
            seq.output_token_ids.append(token)
            seq.output_counts[token] = seq.output_counts.get(token, 0) + 1
        seq.text.stops = list(params.stop)
        if params.structured is not None:
            # A decode engine's matcher starts here too, before the first token arrives; a resumed request's prior
            # output is replayed into it (engine/structured_output.py).
            seq.grammar = self.grammars.matcher_for(params.structured, prior)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = []  # filled while the prompt is computed (engine/prompt_logprobs.py)
        return seq

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
            token_ids = list(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids")
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        return token_ids
