"""The wire's SamplingParameters as the engine's SamplingParams: the one conversion that the router (to refuse bad
values early) and the nodes (to run the request) both use. Torch-free, so the router may import it."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams
from splitserve.v1 import inference_pb2 as pb

# The wire's optional scalars carry the SamplingParams field of the same name; unset ones keep the engine's default.
_OPTIONAL_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)


def sampling_from_proto(msg: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields keep the engine's defaults. Raises InvalidRequestError for bad values."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    return SamplingParams(
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos, **kwargs
    )
