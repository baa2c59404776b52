"""Bench workloads: Azure trace parsing, arrival processes, and prompts of an exact token length."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine.tiny_model import train_tokenizer
from ops.bench.workload import (
    PromptBuilder,
    TraceRequest,
    Workload,
    fixed_concurrency,
    load_azure_trace,
    make_workload,
    poisson_arrivals,
    synthetic_lengths,
    trace_workload,
)

CONV_TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROWS = [
    "2023-11-16 18:15:46.6805900,374,44",
    "2023-11-16 18:15:46.6805901,45,3",  # 1e-7 s later: the 7th fractional digit counts
    "2023-11-16 18:15:47.1805900,5000,900",
    "2023-11-16 18:16:00.0000000,0,0",
    "2023-11-16 18:16:00.0000000,10,2000",
]


def write_trace(tmp_path: Path, rows: list[str], name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "\n".join(rows) + "\n")
    return path


def lengths(requests: list[TraceRequest]) -> list[tuple[int, int]]:
    return [(r.prompt_tokens, r.output_tokens) for r in requests]


# -- Azure traces -------------------------------------------------------------------------------------------------


def test_trace_arrivals_keep_seven_fractional_digits(tmp_path: Path) -> None:
    requests = load_azure_trace(write_trace(tmp_path, ROWS))
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 1e-7, 0.5, 13.31941, 13.31941], abs=1e-12)
    assert lengths(requests) == [(374, 44), (45, 3), (5000, 900), (1, 1), (10, 2000)]  # zeros become 1


def test_trace_time_and_token_scaling(tmp_path: Path) -> None:
    requests = load_azure_trace(write_trace(tmp_path, ROWS), time_scale=10.0, token_scale=0.5)
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 1e-8, 0.05, 1.331941, 1.331941], abs=1e-12)
    # rounded half up (22.5 -> 23, 1.5 -> 2); never below 1
    assert lengths(requests) == [(187, 22), (23, 2), (2500, 450), (1, 1), (5, 1000)]


def test_trace_clipped_to_the_context(tmp_path: Path) -> None:
    requests = load_azure_trace(write_trace(tmp_path, ROWS), max_context=1000)
    # the output keeps its length (up to max_context - 1) and the prompt gets the rest
    assert lengths(requests) == [(374, 44), (45, 3), (100, 900), (1, 1), (1, 999)]
    assert all(r.prompt_tokens + r.output_tokens <= 1000 for r in requests)


def test_trace_start_and_limit(tmp_path: Path) -> None:
    requests = load_azure_trace(write_trace(tmp_path, ROWS), start=2, limit=2)
    assert lengths(requests) == [(5000, 900), (1, 1)]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 12.81941])  # relative to the first row read
    assert load_azure_trace(write_trace(tmp_path, ROWS), limit=0) == []


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("2023-11-16 18:15:48.0000000,abc,4", r"trace\.csv: line 3: ContextTokens 'abc' is not an integer"),
        ("2023-11-16 18:15:48.0000000,10,-4", r"line 3: GeneratedTokens -4 is negative"),
        ("16/11/2023 18:15,10,4", r"line 3: TIMESTAMP '16/11/2023 18:15' is not like"),
        ("2023-11-31 18:15:48.0,10,4", r"line 3: TIMESTAMP '2023-11-31 18:15:48.0': day is out of range"),
        ("2023-11-16 18:15:48.0000000,10", r"line 3: expected 3 fields, got 2"),
        ("2023-11-16 18:15:40.0000000,10,4", r"line 3: TIMESTAMP goes back in time"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write_trace(tmp_path, [ROWS[0], row])
    with pytest.raises(ValueError, match=message):
        load_azure_trace(path)


def test_trace_header_and_arguments_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match=r"other\.csv: line 1: missing column\(s\) TIMESTAMP"):
        load_azure_trace(path)
    trace = write_trace(tmp_path, ROWS)
    for bad in ({"time_scale": 0.0}, {"token_scale": -1.0}, {"max_context": 1}, {"limit": -1}, {"start": -1}):
        with pytest.raises(ValueError):
            load_azure_trace(trace, **bad)


def test_first_rows_of_the_conversation_trace() -> None:
    if not CONV_TRACE.is_file():
        pytest.skip(f"{CONV_TRACE} not present")
    requests = load_azure_trace(CONV_TRACE, limit=50)
    assert len(requests) == 50
    assert requests[0] == TraceRequest(arrival_s=0.0, prompt_tokens=374, output_tokens=44)
    assert requests[1].arrival_s == pytest.approx(4.314579)  # 18:15:50.9951690 - 18:15:46.6805900
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(requests))
    assert trace_workload(requests).mode == "open"


# -- arrivals and workloads ---------------------------------------------------------------------------------------


def test_poisson_arrivals_mean_rate_and_determinism() -> None:
    arrivals = poisson_arrivals(5.0, 2000, seed=0)
    assert arrivals[0] == 0.0 and len(arrivals) == 2000
    assert (len(arrivals) - 1) / arrivals[-1] == pytest.approx(5.0, rel=0.05)
    assert arrivals == poisson_arrivals(5.0, 2000, seed=0)
    assert arrivals != poisson_arrivals(5.0, 2000, seed=1)
    bursty = poisson_arrivals(5.0, 2000, seed=0, burstiness=0.5)
    assert (len(bursty) - 1) / bursty[-1] == pytest.approx(5.0, rel=0.1)
    assert poisson_arrivals(float("inf"), 3, seed=0) == [0.0, 0.0, 0.0]
    assert poisson_arrivals(1.0, 0, seed=0) == []
    with pytest.raises(ValueError, match="rate_per_s"):
        poisson_arrivals(0.0, 3, seed=0)


def test_open_and_closed_workloads() -> None:
    open_loop = make_workload([10, 20], [5, 6], arrivals=[0.0, 0.5], concurrency=8)
    assert (open_loop.mode, open_loop.concurrency) == ("open", 8)
    assert open_loop.requests[1] == TraceRequest(arrival_s=0.5, prompt_tokens=20, output_tokens=6)
    closed = fixed_concurrency([10, 20, 30], [5, 6, 7], concurrency=2)
    assert (closed.mode, closed.concurrency, closed.total_prompt_tokens, closed.total_output_tokens) == (
        "closed",
        2,
        60,
        18,
    )
    with pytest.raises(ValueError, match="needs a concurrency"):
        make_workload([10], [5], arrivals=None)
    with pytest.raises(ValueError, match="non-decreasing"):
        make_workload([10, 20], [5, 6], arrivals=[1.0, 0.5])
    with pytest.raises(ValueError, match=">= 1"):
        Workload((TraceRequest(0.0, 0, 5),), "open")


def test_synthetic_lengths() -> None:
    prompts, outputs = synthetic_lengths(500, prompt_tokens=100, output_tokens=10, range_ratio=0.5, seed=3)
    assert min(prompts) >= 50 and max(prompts) <= 150 and max(prompts) - min(prompts) > 80
    assert min(outputs) >= 5 and max(outputs) <= 15
    assert (prompts, outputs) == synthetic_lengths(
        500, prompt_tokens=100, output_tokens=10, range_ratio=0.5, seed=3
    )
    assert synthetic_lengths(2, prompt_tokens=7, output_tokens=1) == ([7, 7], [1, 1])


# -- prompts of an exact token length -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tokenizer_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    train_tokenizer(1000, request.param).save(str(path))
    return path


def test_prompts_have_exact_token_counts(tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    builder = PromptBuilder(tokenizer_file.parent, seed=7)  # a model directory works too
    for index, n in enumerate([1, 2, 3, 17, 64, 513, 4096, 8192]):
        prompt = builder.build(n, index)
        assert prompt.num_tokens == n and prompt.exact
        assert list(prompt.token_ids) == tokenizer.encode(prompt.text, add_special_tokens=False).ids


def test_prompts_are_deterministic_per_seed_and_index(tokenizer_file: Path) -> None:
    builder = PromptBuilder(tokenizer_file, seed=7)
    first = builder.build(100, 3)
    assert PromptBuilder(tokenizer_file, seed=7).build(100, 3) == first
    assert builder.build(100, 4).text != first.text
    assert PromptBuilder(tokenizer_file, seed=8).build(100, 3).text != first.text
    assert builder.build_many([5, 100], first_index=2) == [
        builder.build(5, 2),
        first,
    ]  # batched, same prompts
    with pytest.raises(ValueError, match="num_tokens"):
        builder.build(0, 0)


def test_prompt_builder_needs_a_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        PromptBuilder(tmp_path)
