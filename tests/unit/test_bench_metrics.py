"""Bench metric math against values computed by hand; results files, comparison, plot data and the progress line."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ops.bench.metrics import (
    GoodputSlos,
    RequestSample,
    RequestTiming,
    SloCheck,
    Summary,
    request_samples,
    summarize,
    tbt_gaps,
)
from ops.bench.plots import PlotUnavailable, cdf_points, plot_run, timeline
from ops.bench.progress import Progress
from ops.bench.report import compare, load_results, read_request_csv, write_request_csv, write_results
from ops.bench.slo import splitwise_slo_check
from ops.bench.stats import Stats, percentile

approx = pytest.approx


def run_timings() -> list[RequestTiming]:
    """Six requests; times are binary fractions so that every derived value below is exact.

    0: 5 tokens, the middle three in one chunk: TTFT 0.5, E2E 1.25, TPOT 0.75/4 = 0.1875, TBT gaps [0.25, 0.5]
    1: 3 tokens one by one:                    TTFT 0.75, E2E 1.0, TPOT 0.25/2 = 0.125, TBT gaps [0.125, 0.125]
    2: 1 token:                                TTFT 0.25, E2E 0.25, no TPOT, no gaps
    3, 5: timeouts; 4: an HTTP 503 (the last one to end, at 12.0: the run lasts 12.0 - 10.0 = 2 s)
    """
    return [
        RequestTiming(10.0, 10.5, [10.5, 10.75, 10.75, 10.75, 11.25], 11.25, 100, 5),
        RequestTiming(10.25, 11.0, [11.0, 11.125, 11.25], 11.25, 200, 3),
        RequestTiming(11.0, 11.25, [11.25], 11.25, 50, 1),
        RequestTiming(11.0, None, [], 11.5, 80, 0, error="timeout: no response in 30 s"),
        RequestTiming(11.5, None, [], 12.0, 80, 0, error="http_503: Service Unavailable"),
        RequestTiming(11.5, 11.75, [11.75], 11.875, 80, 1, error="timeout: read"),
    ]


def sample(
    index: int,
    ttft: float,
    tpot: float | None,
    e2e: float,
    *,
    prompt: int = 64,
    output: int = 16,
    error: str | None = None,
) -> RequestSample:
    ok = error is None
    return RequestSample(
        index=index,
        start_s=float(index),
        end_s=float(index) + e2e,
        prompt_tokens=prompt,
        output_tokens=output,
        ttft_s=ttft if ok else None,
        tpot_s=tpot if ok else None,
        e2e_s=e2e if ok else None,
        tbt_max_s=None,
        arrivals=output,
        server_ttft_s=None,
        error=error,
    )


def stat_values(stats: Stats) -> tuple[float | None, ...]:
    return (stats.count, stats.mean, stats.min, stats.p50, stats.p90, stats.p99, stats.max)


# -- percentiles --------------------------------------------------------------------------------------------------


def test_percentile_is_linear_interpolation_between_closest_ranks() -> None:
    values = [10.0, 1.0, 4.0, 2.0, 3.0]  # sorted: 1 2 3 4 10
    assert percentile(values, 50) == 3.0  # rank 2
    assert percentile(values, 90) == approx(7.6)  # rank 3.6: 4 + 0.6 * (10 - 4)
    assert percentile(values, 99) == approx(9.76)  # rank 3.96: 4 + 0.96 * 6
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == 1.75  # rank 0.75
    assert percentile([7.0], 99) == 7.0
    for q in (0, 1, 33.3, 50, 90, 99, 100):  # the same numbers as numpy's default method
        assert percentile(values, q) == np.percentile(values, q)


def test_percentile_with_an_infinite_value() -> None:
    values = [1.0, 2.0, 3.0, math.inf]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 66.67) == math.inf  # rank 2.0001: any weight on +inf is +inf
    assert percentile([1.0, math.inf, math.inf], 99) == math.inf


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


# -- per-request metrics ------------------------------------------------------------------------------------------


def test_tbt_counts_a_multi_token_chunk_as_one_arrival() -> None:
    assert tbt_gaps([1.0, 1.5, 1.5, 1.5, 2.0]) == [0.5, 0.5]
    assert tbt_gaps([1.0]) == []
    first = request_samples(run_timings())[0]
    assert first.arrivals == 3
    assert first.tbt_max_s == 0.5


def test_per_request_ttft_tpot_e2e() -> None:
    samples = request_samples(run_timings())
    assert [(s.ttft_s, s.tpot_s, s.e2e_s) for s in samples[:3]] == [
        (0.5, 0.1875, 1.25),
        (0.75, 0.125, 1.0),
        (0.25, None, 0.25),  # one token: no TPOT
    ]
    assert [s.start_s for s in samples] == [0.0, 0.25, 1.0, 1.0, 1.5, 1.5]
    failed = samples[5]  # a timeout after the first token: no latency metrics at all
    assert (failed.ok, failed.ttft_s, failed.e2e_s) == (False, None, None)


def test_no_first_token_without_error_counts_as_failed() -> None:
    summary = summarize([RequestTiming(0.0, None, [], 1.0, 10, 0)])
    assert (summary.completed, summary.failed, summary.errors_by_kind) == (0, 1, {"no_tokens": 1})
    assert summary.ttft_s == Stats(count=0, mean=None, min=None, p50=None, p90=None, p99=None, max=None)


# -- aggregates ---------------------------------------------------------------------------------------------------


def test_summary_aggregates() -> None:
    s = summarize(run_timings())
    assert (s.requests, s.completed, s.failed) == (6, 3, 3)
    assert s.errors_by_kind == {"http_503": 1, "timeout": 2}
    assert s.duration_s == 2.0
    assert s.request_throughput == 1.5  # 3 completed / 2 s
    assert s.output_throughput == 4.5  # (5 + 3 + 1) tokens / 2 s; failed requests' tokens do not count
    assert s.input_throughput == 175.0  # (100 + 200 + 50) / 2
    assert (s.total_prompt_tokens, s.total_output_tokens) == (350, 9)
    # (count, mean, min, p50, p90, p99, max), over the completed requests only
    # TTFT sorted 0.25 0.5 0.75: p90 rank 1.8 -> 0.5 + 0.8 * 0.25; p99 rank 1.98
    assert stat_values(s.ttft_s) == approx((3, 0.5, 0.25, 0.5, 0.7, 0.745, 0.75))
    # TPOT 0.125 0.1875: p90 rank 0.9 -> 0.125 + 0.9 * 0.0625
    assert stat_values(s.tpot_s) == approx((2, 0.15625, 0.125, 0.15625, 0.18125, 0.186875, 0.1875))
    # TBT pooled over requests, 0.125 0.125 0.25 0.5 (the 3-token chunk adds one gap): p50 rank 1.5, p90 rank 2.7
    assert stat_values(s.tbt_s) == approx((4, 0.25, 0.125, 0.1875, 0.425, 0.4925, 0.5))
    # E2E 0.25 1.0 1.25
    assert stat_values(s.e2e_s) == approx((3, 2.5 / 3, 0.25, 1.0, 1.2, 1.245, 1.25))
    assert s.server_ttft_s.count == 0


def test_caller_duration_overrides_the_span() -> None:
    assert summarize(run_timings(), duration_s=3.0).request_throughput == 1.0
    assert summarize([]).request_throughput == 0.0
    with pytest.raises(ValueError, match="duration_s"):
        summarize(run_timings(), duration_s=math.nan)


def test_goodput_counts_requests_within_ttft_and_tpot() -> None:
    tight = summarize(run_timings(), slos=GoodputSlos(ttft_s=0.6, tpot_s=0.15)).goodput
    # 0 misses TPOT (0.1875), 1 misses TTFT (0.75), 2 passes (no TPOT with one token); failures never count
    assert tight is not None
    assert (tight.good_requests, tight.goodput_rps, tight.attainment) == (1, 0.5, approx(1 / 6))
    loose = summarize(run_timings(), slos=GoodputSlos(ttft_s=0.8, tpot_s=0.2)).goodput
    assert loose is not None
    assert (loose.good_requests, loose.goodput_rps, loose.attainment) == (3, 1.5, 0.5)
    e2e_only = summarize(run_timings(), slos=GoodputSlos(e2e_s=1.0)).goodput
    assert e2e_only is not None and e2e_only.good_requests == 2  # 1.0 <= 1.0 and 0.25
    with pytest.raises(ValueError, match="at least one"):
        GoodputSlos()
    with pytest.raises(ValueError, match="> 0"):
        GoodputSlos(ttft_s=0.0)


# -- the Splitwise 9-SLO check ------------------------------------------------------------------------------------


def baseline_samples(n: int = 10) -> list[RequestSample]:
    return [sample(i, ttft=0.5, tpot=0.25, e2e=4.0) for i in range(n)]


def loaded_samples(ttft_slowdowns: list[float], tbt: float, e2e: float) -> list[RequestSample]:
    return [sample(i, ttft=0.5 * x, tpot=0.25 * tbt, e2e=4.0 * e2e) for i, x in enumerate(ttft_slowdowns)]


TTFT_SLOWDOWNS = [1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.75, 1.875, 2.5, 5.0]


def rows_of(check: SloCheck) -> dict[tuple[str, int], tuple[float | None, bool]]:
    return {(r.metric, r.percentile): (r.slowdown, r.ok) for r in check.rows}


def test_nine_slos_pass_per_request() -> None:
    check = splitwise_slo_check(loaded_samples(TTFT_SLOWDOWNS, tbt=1.25, e2e=1.125), baseline_samples())
    assert (check.mode, check.compared, check.passed) == ("per_request", 10, True)
    rows = rows_of(check)
    # TTFT slowdowns sorted as above: p50 rank 4.5 -> 1.25; p90 rank 8.1 -> 2.5 + 0.1*2.5; p99 rank 8.91
    assert rows["ttft", 50] == (1.25, True)
    assert rows["ttft", 90] == (approx(2.75), True)
    assert rows["ttft", 99] == (approx(4.775), True)
    assert rows["tbt", 50] == (1.25, True)  # the limit itself holds: slowdown <= limit
    assert rows["e2e", 99] == (1.125, True)
    assert [(r.metric, r.percentile, r.limit) for r in check.rows] == [
        ("ttft", 50, 2.0), ("ttft", 90, 3.0), ("ttft", 99, 6.0),
        ("tbt", 50, 1.25), ("tbt", 90, 1.5), ("tbt", 99, 5.0),
        ("e2e", 50, 1.25), ("e2e", 90, 1.5), ("e2e", 99, 5.0),
    ]  # fmt: skip


def test_nine_slos_fail_on_one_limit() -> None:
    check = splitwise_slo_check(loaded_samples(TTFT_SLOWDOWNS, tbt=1.375, e2e=1.125), baseline_samples())
    assert not check.passed
    assert [(r.metric, r.percentile) for r in check.rows if not r.ok] == [
        ("tbt", 50)
    ]  # 1.375 > 1.25 <= 1.5, 5


def test_a_failed_request_is_an_infinite_slowdown() -> None:
    run = loaded_samples([*TTFT_SLOWDOWNS[:9], 1.0], tbt=1.0, e2e=1.0)
    run[9] = sample(9, 0.0, 0.0, 0.0, error="timeout: x")
    check = splitwise_slo_check(run, baseline_samples())
    rows = rows_of(check)
    assert rows["ttft", 50] == (1.25, True)
    assert rows["ttft", 90] == (math.inf, False)  # rank 8.1 puts weight on the failure
    assert rows["e2e", 99] == (math.inf, False)


def test_infinite_slowdowns_survive_the_json_round_trip() -> None:
    baseline = request_samples(run_timings())
    baseline[3:] = [sample(i, ttft=0.25, tpot=None, e2e=0.5, prompt=80, output=1) for i in (3, 4, 5)]
    summary = summarize(run_timings(), baseline=baseline)
    assert summary.slo_check is not None and summary.slo_check.mode == "per_request"
    assert rows_of(summary.slo_check)["ttft", 99] == (math.inf, False)  # 3 of 6 requests failed
    assert '"slowdown": "inf"' in summary.to_json()
    assert Summary.from_json(summary.to_json()) == summary


def test_other_requests_fall_back_to_percentile_ratios() -> None:
    run = [sample(i, ttft=1.0, tpot=0.25, e2e=2.0) for i in range(4)]
    baseline = [sample(i, ttft=0.5, tpot=0.25, e2e=1.0) for i in range(3)]
    check = splitwise_slo_check(run, baseline)
    assert check.mode == "percentile"
    rows = rows_of(check)
    assert rows["ttft", 50] == (2.0, True)  # P50 1.0 / P50 0.5
    assert rows["tbt", 99] == (1.0, True)
    assert rows["e2e", 50] == (2.0, False)
    assert not check.passed
    # same count but other prompt lengths: not the same requests either
    other = [sample(i, ttft=0.5, tpot=0.25, e2e=1.0, prompt=65) for i in range(4)]
    assert splitwise_slo_check(run, other).mode == "percentile"


def test_no_baseline_to_compare_never_passes() -> None:
    check = splitwise_slo_check([], [])
    assert (check.compared, check.passed) == (0, False)


# -- results files and comparison ---------------------------------------------------------------------------------


def test_results_json_round_trip(tmp_path: Path) -> None:
    summary = summarize(run_timings(), slos=GoodputSlos(ttft_s=0.6), baseline=request_samples(run_timings()))
    assert Summary.from_json(summary.to_json()) == summary
    path = write_results(tmp_path / "a.json", summary, {"endpoint": "http://x", "rate": 2.0})
    loaded = load_results(path)
    assert loaded.summary == summary and loaded.config == {"endpoint": "http://x", "rate": 2.0}
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a splitserve bench results file"):
        load_results(tmp_path / "bad.json")


def test_request_csv_round_trip(tmp_path: Path) -> None:
    samples = request_samples(run_timings())
    path = write_request_csv(tmp_path / "requests.csv", samples)
    assert read_request_csv(path) == samples
    path.write_text(path.read_text().replace("0.1875", "x", 1))
    with pytest.raises(ValueError, match=r"line 2: could not convert"):
        read_request_csv(path)


def test_compare_renders_both_runs_and_ratios(tmp_path: Path) -> None:
    a = write_results(tmp_path / "a.json", summarize(run_timings()), {})
    b = write_results(tmp_path / "b.json", summarize(run_timings(), duration_s=4.0), {})
    lines = compare(a, b, labels=("before", "after")).splitlines()
    assert lines[0].split() == ["metric", "before", "after", "after/before"]
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    by_name = {row[0]: row[1:] for row in cells}
    assert by_name["request throughput (req/s)"] == ["1.500", "0.750", "0.500"]
    assert by_name["ttft p50 (ms)"] == ["500.000", "500.000", "1.000"]
    assert by_name["errors: timeout"] == ["2", "2", "1.000"]
    assert "server ttft p50 (ms)" not in by_name  # no samples on either side


# -- plot data ----------------------------------------------------------------------------------------------------


def test_plot_data() -> None:
    assert cdf_points([3.0, 1.0, 2.0]) == ([1.0, 2.0, 3.0], [1 / 3, 2 / 3, 1.0])
    series = timeline(request_samples(run_timings()), bin_s=1.0)
    assert series.bin_starts_s == [0.0, 1.0, 2.0]
    assert series.completed_rps == [0.0, 3.0, 0.0]  # all three finish at 1.25 s
    assert series.output_tps == [0.0, 9.0, 0.0]
    assert series.errors == [0, 2, 1]  # they end at 1.5, 1.875 | 2.0
    assert series.ttft_p50_s == [0.625, 0.25, None]  # sent at 0, 0.25 | 1.0 | none
    with pytest.raises(ValueError, match="bin_s"):
        timeline([], bin_s=0.0)


def test_plotting_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(PlotUnavailable, match="install matplotlib for --plot"):
        plot_run(request_samples(run_timings()), tmp_path)


# -- progress line ------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_lines_are_rate_limited() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(4, stream=out, tty=False, plain_interval_s=10.0, clock=clock)
    for t in (1.0, 2.0, 12.0, 13.0):
        clock.now = t
        progress.request_sent()
        progress.request_done(failed=t == 2.0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the first event, one 10 s later, and the final state
    assert lines[-1] == "bench 4/4 100.0% | in flight 0 | errors 1 | 0.31 req/s | elapsed 0:13"


def test_progress_redraws_in_place_on_a_terminal() -> None:
    out, clock = io.StringIO(), FakeClock()
    with Progress(2, stream=out, tty=True, clock=clock) as progress:
        clock.now = 1.0
        progress.request_done()
    text = out.getvalue()
    assert text.startswith(
        "\rbench 1/2  50.0% | in flight 0 | errors 0 | 1.00 req/s | elapsed 0:01 | eta 0:01\x1b[K"
    )
    assert text.endswith("\x1b[K\n") and text.count("\n") == 1
