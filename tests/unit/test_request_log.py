"""The router's request log (what the dashboard shows of requests), on a hand-driven clock."""

from __future__ import annotations

import pytest

from router.request_log import RECENT_REQUESTS, RequestLog


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make_log() -> tuple[RequestLog, Clock]:
    clock = Clock()
    return RequestLog(clock=clock, monotonic=clock), clock


def test_a_pair_request_is_split_into_consecutive_phases() -> None:
    log, clock = make_log()
    record = log.start("r1", prompt_tokens=100)
    record.placed("pair", {"prefill": "p0", "decode": "d0"})
    clock.now += 0.010  # placement and reservation
    rpc_started = clock.now
    clock.now += 0.100  # the prefill RPC: 20 ms queued, 60 ms compute, 20 ms transfer wait
    record.prefilled(rpc_started, queue_s=0.020, compute_s=0.080, transfer_wait_s=0.020)
    record.first_token(clock.now)
    record.output_tokens = 11
    clock.now += 0.500
    log.finish(record, "ok")
    assert record.phases == pytest.approx(
        {"router": 0.010, "queue": 0.020, "prefill": 0.060, "transfer": 0.020, "decode": 0.500}
    )
    assert record.ttft_s == pytest.approx(0.110) and record.e2e_s == pytest.approx(0.610)
    assert sum(record.phases.values()) == pytest.approx(record.e2e_s)
    assert record.tbt_s == pytest.approx(0.050)  # 500 ms over the 10 gaps after the first token
    assert (log.running, log.finished, log.failed) == (0, 1, 0)


def test_a_colocated_request_counts_everything_before_its_first_token_as_prefill() -> None:
    log, clock = make_log()
    record = log.start("r1", 10)
    record.placed("colocated", {"colocated": "c0"})
    clock.now += 0.2
    record.first_token(clock.now)
    clock.now += 0.3
    log.finish(record, "ok")
    assert record.phases["prefill"] == pytest.approx(0.2) and record.phases["decode"] == pytest.approx(0.3)


def test_outcomes_count_once_and_failures_are_kept_as_errors() -> None:
    log, _ = make_log()
    failed = log.start("bad", 5)
    log.finish(failed, "UNAVAILABLE", "no node could serve the request")
    log.finish(failed, "ok")  # a later finish (the generator's cleanup) changes nothing
    cancelled = log.start("gone", 5)
    log.finish(cancelled, "cancelled")
    assert failed.outcome == "UNAVAILABLE" and (log.finished, log.failed, log.running) == (0, 1, 0)
    assert [e["request_id"] for e in log.errors()] == ["bad"]  # a client that left is not an error
    assert log.errors()[0]["message"] == "no node could serve the request"


def test_series_groups_finished_requests_into_windows_with_percentiles() -> None:
    log, clock = make_log()
    for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4]):
        record = log.start(f"r{i}", 10)
        record.placed("pair", {})
        clock.now += ttft
        record.first_token(clock.now)
        record.output_tokens = 3
        record.transfer_bytes = 1000
        clock.now += 0.2
        log.finish(record, "ok")
    # 4 requests finished within [1000, 1002]; the window of 5 s ending at 1004 holds them all.
    clock.now = 1004.5
    points = log.series(seconds=20, window=5)
    assert [p["at"] for p in points] == [989, 994, 999, 1004]
    last = points[-1]
    assert last["requests_per_s"] == pytest.approx(4 / 5) and last["tokens_per_s"] == pytest.approx(12 / 5)
    assert last["transfer_bytes_per_s"] == pytest.approx(4000 / 5)
    assert last["ttft_p50_s"] == pytest.approx(0.2) and last["ttft_p99_s"] == pytest.approx(0.4)
    assert last["tbt_p50_s"] == pytest.approx(0.1)
    assert points[0]["ttft_p50_s"] is None and points[0]["requests_per_s"] == 0


def test_memory_is_bounded_and_old_requests_are_forgotten() -> None:
    log, _ = make_log()
    for i in range(RECENT_REQUESTS + 5):
        log.finish(log.start(f"r{i}", 1), "ok")
    assert log.get("r0") is None and log.get(f"r{RECENT_REQUESTS + 4}") is not None
    assert [r.request_id for r in log.recent(2)] == [f"r{RECENT_REQUESTS + 4}", f"r{RECENT_REQUESTS + 3}"]
    assert log.finished == RECENT_REQUESTS + 5
