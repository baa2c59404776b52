"""`splitserve simulate` end to end: a slice of conv.csv through the installed CLI, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.report import read_request_csv
from ops.cli import main

pytestmark = pytest.mark.timeout(120)
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CSV = DATA / "splitwise-perf-model" / "perf_model.csv"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
BASE = ["simulate", "--trace", str(CONV), "--perf-model", str(CSV)]


def test_a_trace_slice_prints_the_report_and_writes_json_and_csv(tmp_path: Path) -> None:
    out, requests_csv = tmp_path / "sim.json", tmp_path / "requests.csv"
    completed = subprocess.run(
        [sys.executable, "-m", "ops.cli", *BASE, "--design", "splitwise-hh", "--prefill", "3", "--decode", "2",
         "--limit", "500", "--time-scale", "2", "--output", str(out), "--requests-csv", str(requests_csv)],
        capture_output=True, text=True, timeout=100, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    for text in (
        "TTFT (s)",
        "TBT (s)",
        "E2E (s)",
        "9-SLO check",
        "requests/s",
        "/h)",
        "kWh",
        "machine-hours",
    ):
        assert text in completed.stdout
    document = json.loads(out.read_text())
    result = document["result"]
    assert result["requests"] == 500 and result["machines"] == 5
    assert len(result["slo"]["rows"]) == 9
    assert result["cost_usd"] == pytest.approx(result["cost_per_hour"] * result["duration_s"] / 3600)
    nodes = set(result["per_request"]["prefill_node"])
    assert nodes <= {"prefill-0", "prefill-1", "prefill-2"} and len(nodes) == 3
    samples = read_request_csv(requests_csv)  # the bench's own reader: a simulation can be a bench baseline
    assert [s.prompt_tokens for s in samples] == result["per_request"]["prompt_tokens"]
    assert [s.e2e_s for s in samples] == pytest.approx(result["per_request"]["e2e_s"])


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("splitserve simulate: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header_only = tmp_path / "header.csv"
    header_only.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,many,44\n")
    split = ["--design", "splitwise-aa", "--prefill", "1", "--decode", "1"]
    perf = ["--perf-model", str(CSV)]
    cases = {
        "no requests": ["simulate", "--trace", str(header_only), *perf, *split],
        "ContextTokens 'many' is not an integer": ["simulate", "--trace", str(malformed), *perf, *split],
        "empty file": ["simulate", "--trace", str(tmp_path / "empty.csv"), *perf, *split],
        "No such file": ["simulate", "--trace", str(tmp_path / "absent.csv"), *perf, *split],
        "unknown cluster design 'splitwise-zz'": [*BASE, "--design", "splitwise-zz", "--prefill", "1"],
        "unknown machine type 'dgx-b200'": [*BASE, "--prefill-type", "dgx-b200", "--prefill", "1",
                                            "--decode-type", "dgx-a100", "--decode", "1"],
        "no measurements for llama2-70b/a100-80gb/tp1": [*BASE, *split, "--model", "llama2-70b", "--tp", "1"],
        "missing column": ["simulate", "--trace", str(CONV), "--perf-model", str(malformed), *split],
        "give --design NAME": [*BASE, "--prefill", "3"],
    }  # fmt: skip
    (tmp_path / "empty.csv").write_text("")
    for expected, argv in cases.items():
        assert expected in _error_of([*argv, "--limit", "20"], capsys), expected


SPLITWISE_TRACE = Path(__file__).resolve().parents[1] / "data" / "splitwise-sim" / "trace_conv_130rps_10s.csv"
SPLITWISE_BASE = [
    "simulate",
    "--trace",
    str(SPLITWISE_TRACE),
    "--perf-model",
    str(CSV),
    "--fidelity",
    "splitwise-sim",
]


def test_splitwise_sim_fidelity_reads_its_trace_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    argv = [
        *SPLITWISE_BASE,
        "--design",
        "splitwise-hh",
        "--prefill",
        "25",
        "--decode",
        "15",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    assert "policy splitwise-sim mixed_pool" in capsys.readouterr().out
    result = json.loads(out.read_text())["result"]
    assert result["requests"] == 1274 and result["slo_passed"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "cost"], "placement policy has no meaning in SplitwiseSim fidelity"),
        (["--link-gbps", "400"], "link_gbps has no meaning in SplitwiseSim fidelity"),
        (["--token-scale", "0.5"], "--token-scale applies to Azure traces only"),
    ],
)
def test_splitwise_sim_fidelity_refuses_what_it_does_not_model(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*SPLITWISE_BASE, "--design", "splitwise-hh", "--prefill", "2", "--decode", "1", *extra]
    assert message in _error_of(argv, capsys)
