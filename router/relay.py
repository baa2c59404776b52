"""What the client sees of a request: the router rewrites every node message into one continuous stream.

`Relay` gives node messages the client's request id, counts delivered tokens (they become prior output if the
stream must resume on another pair), and puts usage on the last message: tokens, TTFT, and the energy and cost
every node charged. `OutputLengthEstimate` is the router's guess of a request's length before it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from router.metrics import RequestTimer
from router.request_log import RequestRecord
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import inference_pb2 as pb


class OutputLengthEstimate:
    """How many tokens a request will generate, guessed before it runs: an exponential moving average of the
    lengths of finished requests (over roughly the last 100), capped by the request's max_tokens."""

    def __init__(self, initial: float = 128.0, weight: float = 0.01) -> None:
        self.mean = initial
        self.weight = weight

    def observe(self, tokens: int) -> None:
        self.mean += self.weight * (tokens - self.mean)

    def expected(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, round(self.mean)))


class Relay:
    """Rewrites node messages for the client: the client's request id, usage and TTFT on the last message.

    The last message's usage also carries the request's energy and cost: the sum of every node's charges over every
    attempt (a prefill whose decode node died still used its machine), told to `on_finish` (the metrics)."""

    def __init__(
        self,
        record: RequestRecord,
        with_logprobs: bool,
        on_finish: Callable[[pb.Usage], None] | None = None,
        timer: RequestTimer | None = None,
    ) -> None:
        # The request's record (router/request_log.py) holds its id, arrival, prompt length and timings; the
        # relay adds what the client is sent.
        self.record = record
        self.with_logprobs = with_logprobs
        self.delivered: list[int] = []  # token ids the client has received
        self.cached = 0
        self.charges = pb.ChargeBreakdown()
        self.on_finish = on_finish
        self.timer = timer

    def charge(self, part: pb.ChargeBreakdown) -> None:
        """Add one node's share (a prefill response's, or a decode or colocated node's final usage)."""
        for name in _CHARGE_AMOUNTS:
            setattr(self.charges, name, getattr(self.charges, name) + getattr(part, name))
        ours, theirs = self.charges.power_source, part.power_source
        if theirs and ours != theirs:
            self.charges.power_source = theirs if not ours else "mixed"

    def prefilled(self, rpc_started: float, response: cpb.PrefillResponse) -> None:
        """A prefill node answered; its split of the time goes to the request's record."""
        self.record.prefilled(
            rpc_started, response.queue_seconds, response.compute_seconds, response.transfer_wait_seconds
        )
        self.record.transfer_seconds += response.kv_transfer_seconds
        self.record.transfer_bytes += response.kv_transfer_bytes
        self.record.imported_bytes += response.imported_bytes

    def message(
        self,
        rid: str,
        text: str,
        tokens: list[pb.TokenLogprob],
        finish: int = pb.FINISH_REASON_UNSPECIFIED,
        prompt_logprobs: Iterable[pb.TokenLogprob] = (),
    ) -> pb.GenerateResponse:
        """A message made from a prefill node's answer (its first token, and the prompt's logprobs if asked for)."""
        msg = pb.GenerateResponse(
            text=text,
            token_ids=[t.token_id for t in tokens],
            logprobs=tokens if self.with_logprobs else [],
            finish_reason=finish,
            prompt_logprobs=prompt_logprobs,
        )
        return self.forward(msg)

    def forward(self, msg: pb.GenerateResponse) -> pb.GenerateResponse:
        record = self.record
        msg.request_id = record.request_id
        now = time.monotonic()
        self.delivered.extend(msg.token_ids)
        if self.timer is not None:
            self.timer.tokens(len(msg.token_ids), now)
        if msg.token_ids:
            record.first_token(now)
            record.output_tokens = len(self.delivered)
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.charge(msg.usage.charges)  # the finishing node's share
            self.cached = max(self.cached, msg.usage.cached_prompt_tokens)  # a node serving the whole request
            c = self.charges
            msg.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=len(self.delivered),
                    cached_prompt_tokens=self.cached,
                    ttft_seconds=record.ttft_s or 0.0,
                    energy_joules=c.prefill_energy_joules + c.transfer_energy_joules + c.decode_energy_joules,
                    cost_usd=c.prefill_cost_usd + c.transfer_cost_usd + c.decode_cost_usd,
                    charges=c,
                )
            )
            if self.on_finish is not None:
                self.on_finish(msg.usage)
            record.energy_joules, record.cost_usd = msg.usage.energy_joules, msg.usage.cost_usd
            if self.timer is not None:
                self.timer.finished(now)
        return msg


# Every amount in a ChargeBreakdown (all its double fields), summed field by field over nodes.
_CHARGE_AMOUNTS = tuple(f.name for f in pb.ChargeBreakdown.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
