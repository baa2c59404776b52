"""The router's relay: usage and charges on the last message, and the output-length guess placement uses."""

from __future__ import annotations

from router.relay import OutputLengthEstimate, Relay
from router.request_log import RequestRecord
from splitserve.v1 import inference_pb2 as pb


def test_the_output_length_guess_follows_finished_requests_and_respects_max_tokens() -> None:
    estimate = OutputLengthEstimate(initial=128.0, weight=0.5)
    assert estimate.expected(max_tokens=1000) == 128
    assert estimate.expected(max_tokens=16) == 16
    estimate.observe(28)
    assert estimate.expected(max_tokens=1000) == 78
    for _ in range(30):
        estimate.observe(400)
    assert estimate.expected(max_tokens=1000) == 400
    assert OutputLengthEstimate(initial=0.0).expected(max_tokens=5) == 1


def test_the_last_message_carries_the_sum_of_every_nodes_charges() -> None:
    record = RequestRecord("client-id", prompt_tokens=7, arrived_unix=0.0, arrived=0.0)
    relay = Relay(record, with_logprobs=False)
    relay.charge(pb.ChargeBreakdown(prefill_energy_joules=2.0, prefill_cost_usd=0.5, power_source="modeled"))
    first = relay.message("node-id", "a", [pb.TokenLogprob(token_id=5)])
    assert first.request_id == "client-id" and not first.HasField("usage")
    last = relay.forward(
        pb.GenerateResponse(
            token_ids=[6, 7],
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(charges=pb.ChargeBreakdown(decode_energy_joules=3.0, power_source="measured")),
        )
    )
    assert last.usage.completion_tokens == 3 and last.usage.prompt_tokens == 7
    assert last.usage.energy_joules == 5.0 and last.usage.cost_usd == 0.5
    assert last.usage.charges.power_source == "mixed"
    assert relay.delivered == [5, 6, 7]
