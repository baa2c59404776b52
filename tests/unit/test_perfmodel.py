"""Splitwise's performance model against rows of perf_model.csv and interpolation computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.perfmodel import MIXED_BATCH_FACTOR, PerfGroup, PerfModel, available

# The shared data lives beside the repository (../shared/data, per the data README).
CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "splitwise-perf-model" / "perf_model.csv"

pytestmark = pytest.mark.skipif(not CSV.exists(), reason="shared perf_model.csv not present")
approx = pytest.approx

# Medians (ms) of the five trials in perf_model.csv, llama2-70b / h100-80gb / tp 8:
PROMPT_128_MS = 58.18541598273441  # lines 497-501: prompt 128, batch 1
PROMPT_512X32_MS = 1551.7261609784327  # lines 477-481: prompt 512, batch 32 -> 16384 tokens
PROMPT_512X64_MS = 2936.3297179806978  # lines 487-491: prompt 512, batch 64 -> 32768 tokens
TOKEN_BATCH64_MS = 50.16084560871447  # lines 487-491: token_time at batch 64
CAPPED_PROMPT_512X64_MS = 3817.228633374907  # lines 1082-1086: same point on h100-80gb-pcap


@pytest.fixture(scope="module")
def h100() -> PerfModel:
    return PerfModel.from_csv(CSV, "llama2-70b", "h100-80gb", 8)


@pytest.fixture(scope="module")
def h100_capped() -> PerfModel:
    return PerfModel.from_csv(CSV, "llama2-70b", "h100-80gb-pcap", 8)


def test_available_lists_the_twelve_groups() -> None:
    groups = available(CSV)
    assert len(groups) == 12
    assert PerfGroup("llama2-70b", "h100-80gb-pcap", 2) in groups
    assert PerfGroup("bloom-176b", "a100-80gb", 8) in groups


def test_measured_points_equal_the_csv(h100: PerfModel) -> None:
    assert h100.prompt_time_s(128) == approx(PROMPT_128_MS / 1000)
    assert h100.prompt_time_s(512 * 32) == approx(PROMPT_512X32_MS / 1000)
    assert h100.prompt_time_s(512 * 64) == approx(PROMPT_512X64_MS / 1000)
    assert h100.token_time_s(64) == approx(TOKEN_BATCH64_MS / 1000)


def test_between_points_is_linear(h100: PerfModel) -> None:
    quarter = 16384 + (32768 - 16384) // 4
    expected = PROMPT_512X32_MS + 0.25 * (PROMPT_512X64_MS - PROMPT_512X32_MS)
    assert h100.prompt_time_s(quarter) == approx(expected / 1000)


def test_above_the_last_point_extrapolates_from_the_last_two(h100: PerfModel) -> None:
    expected = PROMPT_512X64_MS + (PROMPT_512X64_MS - PROMPT_512X32_MS)
    assert h100.prompt_time_s(32768 + 16384) == approx(expected / 1000)


def test_below_the_first_point_clamps(h100: PerfModel) -> None:
    assert h100.prompt_time_s(1) == h100.prompt_time_s(64) == approx(PROMPT_128_MS / 1000)


def test_token_time_grows_with_batch(h100: PerfModel) -> None:
    assert h100.token_time_s(1) < h100.token_time_s(16) < h100.token_time_s(64)
    assert 0.025 < h100.token_time_s(1) < 0.035


def test_capped_h100_prompt_is_1_30x_and_token_unchanged(h100: PerfModel, h100_capped: PerfModel) -> None:
    assert h100_capped.prompt_time_s(32768) == approx(CAPPED_PROMPT_512X64_MS / 1000)
    for tokens in (128, 3000, 32768):
        assert h100_capped.prompt_time_s(tokens) == approx(1.30 * h100.prompt_time_s(tokens), rel=1e-3)
    assert h100_capped.token_time_s(64) == approx(h100.token_time_s(64))


def test_mixed_batch_is_1_1x_the_prompt_batch_of_all_its_tokens(h100: PerfModel) -> None:
    assert MIXED_BATCH_FACTOR == 1.1
    assert h100.mixed_time_s(2000, 48) == approx(1.1 * h100.prompt_time_s(2048))
    assert h100.mixed_time_s(2048, 0) == h100.prompt_time_s(2048)
    assert h100.mixed_time_s(0, 8) == h100.token_time_s(8)


def test_average_power_only_where_measured(h100: PerfModel) -> None:
    a100 = PerfModel.from_csv(CSV, "llama2-70b", "a100-80gb", 8)
    assert a100.average_power_fraction is not None
    assert 0.1 < a100.average_power_fraction <= 1.0
    assert h100.average_power_fraction is None


def test_unknown_group_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="llama2-70b/h100-80gb/tp8") as info:
        PerfModel.from_csv(CSV, "llama2-70b", "h100-80gb", 3)
    assert "bloom-176b/a100-80gb/tp8" in str(info.value)


@pytest.mark.parametrize("bad", [0, -5])
def test_empty_batches_are_rejected(h100: PerfModel, bad: int) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        h100.token_time_s(bad)
    with pytest.raises(ValueError, match="batch_prompt_tokens"):
        h100.prompt_time_s(bad)
    with pytest.raises(ValueError, match="non-empty"):
        h100.mixed_time_s(0, 0)


def test_malformed_csv_names_the_line(tmp_path: Path) -> None:
    header = CSV.read_text().splitlines()[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "\nllama2-70b,h100-80gb,abc,1,128,0,0,1,1,1,8\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 2"):
        PerfModel.from_csv(bad, "llama2-70b", "h100-80gb", 8)
    with pytest.raises(ValueError, match="missing column"):
        (tmp_path / "nohead.csv").write_text("model,hardware\n")
        available(tmp_path / "nohead.csv")
