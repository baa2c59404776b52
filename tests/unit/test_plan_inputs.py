"""What `splitserve plan` refuses, with one-line messages: bad designs, machine types, samples and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.machines import BUILTIN_MACHINES
from ops.plan.designs import DesignSpec, parse_custom_design, resolve_designs
from ops.plan.planner import PlanRequest
from ops.plan.pricing import price_table
from ops.plan.rate_search import RateLimits
from ops.plan.sample import TraceSample
from ops.sim import DESIGNS

CONV = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-inference-2023" / "conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_built_in_and_custom_designs_resolve_in_order() -> None:
    specs = resolve_designs(
        ["baseline-a100", "splitwise-ha"],
        ["mine=dgx-h100-cap:dgx-a100", "solo=cpu"],
        DESIGNS,
        BUILTIN_MACHINES,
    )
    assert [s.name for s in specs] == ["baseline-a100", "splitwise-ha", "mine", "solo"]
    assert specs[1] == DesignSpec("splitwise-ha", "dgx-h100", "dgx-a100")
    assert specs[2].is_split and specs[2].machine_types() == ("dgx-h100-cap", "dgx-a100")
    assert not specs[3].is_split and specs[3].describe() == "colocated cpu"


@pytest.mark.parametrize(
    ("names", "custom", "message"),
    [
        (["splitwise-xx"], [], "unknown design 'splitwise-xx'"),
        ([], ["mine=dgx-b200:dgx-a100"], "unknown machine type 'dgx-b200'"),
        ([], ["mine"], "expected NAME=PREFILL_TYPE:DECODE_TYPE"),
        ([], ["mine=a:b:c"], "expected NAME="),
        ([], ["=dgx-a100"], "expected NAME="),
        (["splitwise-aa"], ["splitwise-aa=dgx-a100"], "given twice"),
        ([], [], "no design to plan"),
    ],
)
def test_bad_designs_are_refused(names: list[str], custom: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_designs(names, custom, DESIGNS, BUILTIN_MACHINES)


def test_a_design_needs_both_split_pools_or_one_colocated() -> None:
    with pytest.raises(ValueError, match="either a prefill and a decode"):
        DesignSpec("half", prefill_type="dgx-a100")
    with pytest.raises(ValueError, match="expected NAME=PREFILL_TYPE:DECODE_TYPE"):
        parse_custom_design("both=dgx-a100:")  # an empty decode type


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        (HEADER, "at least 2 requests"),
        (HEADER + "2023-11-16 18:15:46.6805900,374,44\n", "at least 2 requests"),
        (HEADER + "2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:46.68,10,4\n", "same time"),
        (HEADER + "2023-11-16 18:15:46.68,374,44\nyesterday,10,4\n", "line 3"),
        ("when,prompt,output\n1,2,3\n", "missing column"),
    ],
)
def test_bad_traces_are_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        TraceSample.load(path, start=0, limit=100)
    assert "\n" not in str(caught.value)


def test_a_missing_trace_or_a_sample_past_its_end_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the trace"):
        TraceSample.load(tmp_path / "absent.csv", start=0, limit=100)
    with pytest.raises(ValueError, match="--start and --limit"):
        TraceSample.load(CONV, start=10**6, limit=100)
    with pytest.raises(ValueError, match="--limit must be >= 2"):
        TraceSample.load(CONV, start=0, limit=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rel_tol": 0.0}, "tolerance"), ({"rel_tol": 1.5}, "tolerance"), ({"max_probes": 1}, "max_probes")],
)
def test_bad_search_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimits(**kwargs)  # type: ignore[arg-type]


def test_a_goal_needs_its_budget_or_target() -> None:
    prices = price_table(BUILTIN_MACHINES, ["dgx-a100"], "rated")
    spec = (DesignSpec("baseline-a100", colocated_type="dgx-a100"),)
    with pytest.raises(ValueError, match="needs a budget"):
        PlanRequest("iso-power", spec, prices)
    with pytest.raises(ValueError, match="--target-rps"):
        PlanRequest("min-cost", spec, prices, target_rps=None)
    with pytest.raises(ValueError, match="--max-machines"):
        PlanRequest("min-cost", spec, prices, target_rps=3.0, max_machines=1)
