"""The router's settings: the model it serves, its retry and deadline budget, SLO targets and load shedding."""

from __future__ import annotations

from dataclasses import dataclass

from router.admission import DEFAULT_MAX_ACTIVE, DEFAULT_MAX_QUEUED, DEFAULT_QUEUE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class RouterConfig:
    model_name: str
    max_model_len: int
    vocab_size: int  # the model's (config.json); may exceed the tokenizer's when the embedding is padded
    max_attempts: int = 3
    reserve_hold_s: float = 60.0
    prefill_deadline_s: float = 60.0
    kv_wait_s: float = 30.0
    rpc_timeout_s: float = 10.0
    # Latency targets handed to placement (cost and power policies keep predictions within them); None: none.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # A prefill node may copy the prompt blocks the chosen decode node caches and it lacks, instead of computing them.
    prefix_pull: bool = True
    # Load shedding (router/admission.py) and tokenizing off the event loop (router/prompt_encoder.py).
    max_concurrent_requests: int = DEFAULT_MAX_ACTIVE
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    tokenizer_threads: int = 2
