"""A node's power set-up from its flags (cluster/power/node_power.py and the node CLI): validation, caps, what it registers.

Nodes here run on `cpu`, where the power is modeled. One test gives the node an NVML meter over `StandInNvml` (from
test_power_cap), an object with pynvml's function names standing in for a GPU this machine does not have, to follow
the dry-run path a GPU node takes; its setter refuses to be called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.machines import BUILTIN_MACHINES
from cluster.perfmodel import PerfModel
from cluster.power import node_power
from cluster.power.node_power import choose_perf_group, recommend_for_role, resolve_settings, start_node_power
from cluster.power.powercap import PowerCapError, cap_range_of
from cluster.power.telemetry import NvmlPowerMeter
from ops.cli import main
from tests.unit.test_power_cap import StandInNvml

PERF_CSV = Path(__file__).resolve().parents[2].parent / "shared/data/splitwise-perf-model/perf_model.csv"
H100_GROUP = "llama2-70b/h100-80gb/8"


@pytest.fixture(scope="module")
def one_group_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = PERF_CSV.read_text().splitlines()
    path = tmp_path_factory.mktemp("perf") / "h100.csv"
    keep = [line for line in lines[1:] if line.startswith("llama2-70b,h100-80gb,") and line.endswith(",8")]
    path.write_text("\n".join([lines[0], *keep]) + "\n")
    return path


def start(role: str = "decode", device: str = "cpu", **settings: object) -> node_power.NodePower:
    return start_node_power(resolve_settings(**settings), role, device, 512, 16)  # type: ignore[arg-type]


def test_unknown_names_and_bad_values_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown machine type 'nope'; known: cpu, dgx-a100"):
        resolve_settings("nope")
    with pytest.raises(
        ValueError, match=r"holds 12 groups; pick one with --perf-group: .*llama2-70b/h100-80gb/8"
    ):
        resolve_settings("dgx-h100", perf_csv=PERF_CSV)
    with pytest.raises(ValueError, match="no group 'llama2-70b/h100-80gb/3'"):
        resolve_settings("dgx-h100", perf_csv=PERF_CSV, perf_group="llama2-70b/h100-80gb/3")
    with pytest.raises(ValueError, match="MODEL/HARDWARE/TP"):
        resolve_settings("dgx-h100", perf_csv=PERF_CSV, perf_group="llama2-70b")
    with pytest.raises(ValueError, match="--perf-group needs --perf-model"):
        resolve_settings("dgx-h100", perf_group=H100_GROUP)
    with pytest.raises(ValueError, match="watts per GPU or 'recommend'"):
        resolve_settings("dgx-h100", cap="lots")
    with pytest.raises(ValueError, match="> 0 watts"):
        resolve_settings("dgx-h100", cap="-5")
    with pytest.raises(ValueError, match="recommend needs --perf-model"):
        resolve_settings("dgx-h100", cap="recommend")
    with pytest.raises(ValueError, match="recommend needs GPUs"):
        resolve_settings("cpu", perf_csv=PERF_CSV, perf_group=H100_GROUP, cap="recommend")


def test_the_perf_group_is_the_files_only_one_or_the_named_one(one_group_csv: Path) -> None:
    assert choose_perf_group(one_group_csv, None).hardware == "h100-80gb"
    assert choose_perf_group(PERF_CSV, "llama2-70b/a100-80gb/tp4").tensor_parallel == 4


def test_a_node_registers_its_machine_type_and_latency_lines(one_group_csv: Path) -> None:
    power = start("prefill", machine_type="dgx-h100", perf_csv=one_group_csv)
    h100 = BUILTIN_MACHINES["dgx-h100"]
    expected_perf = PerfModel.from_csv(one_group_csv, "llama2-70b", "h100-80gb", 8).summary().as_tuple()
    assert power.registration() == {
        "machine_type": "dgx-h100",
        "cost_per_hour": h100.cost_per_hour,
        "idle_power_w": h100.idle_power_w,
        "max_power_w": h100.rated_power_w,
        "perf": expected_perf,
    }
    load = power.load_fields()
    assert load["power_source"] == "modeled"
    assert h100.idle_power_w - 102 <= load["power_w"] <= h100.idle_power_w + 102  # idle, rounded to 1% of max
    assert load["power_w"] % (0.01 * h100.rated_power_w) == pytest.approx(0.0, abs=1e-6)
    assert power.log["meter"].startswith("modeled power of dgx-h100")


def test_without_nvml_a_cap_changes_the_modeled_power_only_and_says_so(one_group_csv: Path) -> None:
    power = start(machine_type="dgx-h100", perf_csv=one_group_csv, cap="350", apply=True)
    assert power.machine.max_power_w == pytest.approx(BUILTIN_MACHINES["dgx-h100-cap"].max_power_w)
    assert power.registration()["max_power_w"] == pytest.approx(7140.0)
    assert power.meter.machine.max_power_w == pytest.approx(7140.0)  # type: ignore[attr-defined]
    assert "modeled maximum power only" in power.log["cap_note"]
    assert "nothing to apply" in power.log["cap_note"]
    uncapped = start(machine_type="dgx-h100", perf_csv=one_group_csv).registration()["perf"]
    capped = power.registration()["perf"]
    assert capped[0] == pytest.approx(1.3 * uncapped[0]) and capped[2] == pytest.approx(uncapped[2])
    cpu = start(machine_type="cpu", cap="60")
    assert cpu.machine.max_power_w == 60.0 and cpu.log["cap_w"] == 60.0


def test_a_cap_outside_the_gpu_range_stops_the_node() -> None:
    with pytest.raises(PowerCapError, match=r"outside this GPU's range 350\.\.700 W"):
        start(machine_type="dgx-h100", cap="200")


def test_recommend_judges_a_full_batch_against_splitwise_slos() -> None:
    perf = PerfModel.from_csv(PERF_CSV, "llama2-70b", "h100-80gb", 8)
    caps = cap_range_of(BUILTIN_MACHINES["dgx-h100"])
    # TBT target: 1.25x a lone sequence; 16 sequences fit within it, 64 do not.
    assert recommend_for_role("decode", perf, caps, 2048, 16).watts == 350.0
    assert recommend_for_role("decode", perf, caps, 2048, 64).watts == 700.0
    # TTFT target 2x the batch alone: a 1.3x slowdown at the lowest cap fits; a 1.1x target needs a higher cap.
    assert recommend_for_role("prefill", perf, caps, 2048, 64).watts == 350.0
    tight = recommend_for_role("prefill", perf, caps, 2048, 64, target_s=1.1 * perf.prompt_time_s(2048))
    assert 350.0 < tight.watts < 700.0
    power = start(machine_type="dgx-h100", perf_csv=PERF_CSV, perf_group=H100_GROUP, cap="recommend")
    assert power.log["cap_w"] == 350.0 and "lowest cap allowed" in power.log["cap_reason"]


def test_a_gpu_node_dry_run_logs_the_nvml_calls_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = StandInNvml(gpus=1)
    monkeypatch.setattr(node_power, "create_meter", lambda *args: NvmlPowerMeter(nvml, [0]))
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 420_400  # type: ignore[attr-defined]
    power = start(device="cuda:0", machine_type="dgx-h100", cap="400")
    assert power.log["nvml_calls"] == ["nvmlDeviceSetPowerManagementLimit(gpu 0, 400000 mW)"]
    assert power.log["dry_run"] is True and "--power-cap-apply" in power.log["cap_note"]
    assert nvml.set_calls == []
    assert power.machine.max_power_w == BUILTIN_MACHINES["dgx-h100"].rated_power_w  # not capped: dry run
    assert power.load_fields() == {"power_w": 420.0, "power_source": "measured"}


def test_the_node_cli_refuses_bad_power_flags_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["decode", "--model", str(tmp_path / "no-model"), "--redis-url", "redis://127.0.0.1:1"]
    assert main([*base, "--machine-type", "dgx-h200"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("splitserve decode: error: unknown machine type 'dgx-h200'") and err.count("\n") == 1
    )
    catalog = tmp_path / "machines.json"
    catalog.write_text(json.dumps({"machines": [{"name": "dgx-h200", "accelerator": "h200"}]}))
    assert main([*base, "--machines", str(catalog), "--machine-type", "dgx-h200"]) == 2
    assert "missing field(s)" in capsys.readouterr().err
