"""Conversions between the wire messages (splitserve.v1) and the engine's types, used by the node servers.

Sampling values are converted (and so validated, by the engine's own checks) in cluster/sampling_proto.py, shared with
the router; a node returns INVALID_ARGUMENT with the engine's message.
"""

from __future__ import annotations

from cluster.power.accounting import RequestCharge
from engine.engine import RequestOutput
from engine.sequence import FinishReason, TokenLogprob
from splitserve.v1 import inference_pb2 as pb

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.PREFILL_DONE: pb.FINISH_REASON_UNSPECIFIED,
}


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def finish_to_proto(reason: FinishReason | None) -> int:
    return _FINISH[reason]


def output_to_proto(out: RequestOutput) -> pb.GenerateResponse:
    """A streaming delta; the request's first one carries its prompt logprobs, if they were asked for."""
    return pb.GenerateResponse(
        request_id=out.request_id,
        text=out.new_text,
        token_ids=out.new_token_ids,
        logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
        finish_reason=finish_to_proto(out.finish_reason if out.finished else None),
        prompt_logprobs=prompt_logprobs_to_proto(out),
    )


def prompt_logprobs_to_proto(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [logprob_to_proto(lp) for lp in out.prompt_logprobs or []]


def charges_to_proto(charge: RequestCharge) -> pb.ChargeBreakdown:
    prefill, transfer, decode = (charge.phases[p] for p in ("prefill", "transfer", "decode"))
    return pb.ChargeBreakdown(
        prefill_energy_joules=prefill.energy_j,
        transfer_energy_joules=transfer.energy_j,
        decode_energy_joules=decode.energy_j,
        prefill_cost_usd=prefill.cost_usd,
        transfer_cost_usd=transfer.cost_usd,
        decode_cost_usd=decode.cost_usd,
        power_source=charge.source,
        prefill_seconds=prefill.seconds,
        transfer_seconds=transfer.seconds,
        decode_seconds=decode.seconds,
    )


def charged_usage(charge: RequestCharge) -> pb.Usage:
    """A node's share of a request's usage: energy and cost only (the router counts tokens and TTFT)."""
    return pb.Usage(energy_joules=charge.energy_j, cost_usd=charge.cost_usd, charges=charges_to_proto(charge))
