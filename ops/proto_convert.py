"""Conversions between the wire messages (splitserve.v1) and the engine's types, used by the node servers.

Only the nodes convert into SamplingParams: validation happens once, in the engine's own checks, and the node
returns INVALID_ARGUMENT with the engine's message.
"""

from __future__ import annotations

from typing import Any

from engine.engine import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from splitserve.v1 import inference_pb2 as pb

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.PREFILL_DONE: pb.FINISH_REASON_UNSPECIFIED,
}


def sampling_from_proto(msg: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields keep the engine's defaults. Raises InvalidRequestError for bad values."""
    kwargs: dict[str, Any] = {}
    for name in (
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
    ):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return SamplingParams(
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos, **kwargs
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def finish_to_proto(reason: FinishReason | None) -> int:
    return _FINISH[reason]


def output_to_proto(out: RequestOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=out.request_id,
        text=out.new_text,
        token_ids=out.new_token_ids,
        logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
        finish_reason=finish_to_proto(out.finish_reason if out.finished else None),
    )
