"""The wire's SamplingParameters as the engine's SamplingParams: the one conversion that the router (to refuse bad
values early) and the nodes (to run the request) both use. Torch-free, so the router may import it."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams
from engine.structured_spec import StructuredKind, StructuredOutput
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
    "prompt_logprobs",
)


def sampling_from_proto(msg: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields keep the engine's defaults. Raises InvalidRequestError for bad values."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    return SamplingParams(
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logit_bias=dict(msg.logit_bias),
        structured=structured_from_proto(msg.structured_output)
        if msg.HasField("structured_output")
        else None,
        **kwargs,
    )


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredOutput | None:
    """The constraint the message holds; None when it holds none (or json_object: false)."""
    which = msg.WhichOneof("constraint")
    if which is None or (which == "json_object" and not msg.json_object):
        return None
    if which == "json_object":
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if which == "choice":
        return StructuredOutput(StructuredKind.CHOICE, choices=tuple(msg.choice.choices))
    return StructuredOutput(StructuredKind(which), text=getattr(msg, which))


def structured_to_proto(spec: StructuredOutput) -> pb.StructuredOutput:
    """The message for a constraint (what the router sends; structured_from_proto reads it back)."""
    if spec.kind == StructuredKind.JSON_OBJECT:
        return pb.StructuredOutput(json_object=True)
    if spec.kind == StructuredKind.CHOICE:
        return pb.StructuredOutput(choice=pb.Choices(choices=list(spec.choices)))
    return pb.StructuredOutput(**{spec.kind.value: spec.text})
