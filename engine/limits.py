"""The limits every sampling value and request id must respect, defined once for the engine and every edge.

The engine (SamplingParams.validate), the router's gRPC check (router/sampling_check.py) and the OpenAI HTTP parser
(router/openai_protocol.py) all read these numbers, so a request the router lets through is one a node accepts, and a
value a node would choke on never gets that far. This module imports nothing, so the router (which never loads torch)
can share it.

Why each bound:
- temperature is 0 (greedy) or at least MIN_TEMPERATURE: logits divided by 1e-40 overflow fp32 to inf and the
  softmax turns them into NaN. 1e-2 is where vLLM clamps too; anything below it is greedy in all but name.
- repetition_penalty divides (or multiplies) logits: within [1e-2, 100] a logit stays far from fp32's range.
- seed is any uint64 (the wire's type); the sampler folds it into torch's 64-bit generator seed modulo 2**64.
- the list and length caps keep one request's stop handling, memory and log lines small: stop strings are matched
  against the text after every token, so 10,000 of them (or one of 1 MB) would stall every other request's step.
- logit_bias follows OpenAI (at most 300 entries, each in [-100, 100]): +-100 already bans or forces a token, and a
  larger bias added to a logit could leave fp32's range. Its token ids are checked against the model's vocabulary
  where the vocabulary is known (the engine's request intake).
- prompt_logprobs takes the same 0..MAX_LOGPROBS alternatives as logprobs.
- a structured-output constraint (JSON schema, regex, grammar) is compiled once per distinct text and its compiled
  form is cached: 64 KB of schema text is far more than any real schema and keeps one request from holding the
  compiler (and the cache) for seconds; a choice list is bounded the same way.
"""

from __future__ import annotations

MIN_TEMPERATURE = 1e-2  # below this (and above 0) a request is refused: use 0 for greedy
MAX_TEMPERATURE = 2.0  # OpenAI's documented maximum
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
MAX_UINT32 = 2**32 - 1  # max_tokens, top_k, logprobs, stop and logit_bias token ids travel as uint32
MAX_SEED = 2**64 - 1  # seeds travel as uint64
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 20 for chat)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1_000
MAX_STOP_TOKEN_IDS = 1_024
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_ABS_LOGIT_BIAS = 100.0
MAX_STRUCTURED_OUTPUT_CHARS = 65_536  # a JSON schema, regex or grammar's text; a choice list's total length
MAX_STRUCTURED_CHOICES = 1_024
# A client's request id at the router; the engine allows a little more for the router's retry suffix ("#2").
MAX_REQUEST_ID_CHARS = 256
MAX_ENGINE_REQUEST_ID_CHARS = MAX_REQUEST_ID_CHARS + 64
