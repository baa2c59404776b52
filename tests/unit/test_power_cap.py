"""GPU power caps (cluster/power/powercap.py): their modeled effect, the recommended cap, and the NVML call path.

This machine has no GPU and no NVML; our own GPU machines must never have their settings changed. The NVML path
is therefore exercised through `StandInNvml`, an object with pynvml's function names that stands in for hardware
that cannot exist here: it records setter calls instead of making them, and a dry run must not make any."""

from __future__ import annotations

import pytest

from cluster.machines import BUILTIN_MACHINES
from cluster.power.powercap import (
    CapRange,
    PowerCapError,
    apply_cap,
    cap_range_from_nvml,
    cap_range_of,
    capped_machine,
    latency_factor,
    recommend_cap,
)
from cluster.power.telemetry import load_nvml

H100, A100, CPU = (BUILTIN_MACHINES[n] for n in ("dgx-h100", "dgx-a100", "cpu"))
H100_CAPS = cap_range_of(H100)


class StandInNvml:
    """pynvml's power-limit functions over made-up GPUs (see the module docstring)."""

    def __init__(self, gpus: int = 2, low_mw: int = 200_000, high_mw: int = 700_000, allow_set: bool = False):
        self.gpus, self.low_mw, self.high_mw, self.allow_set = gpus, low_mw, high_mw, allow_set
        self.set_calls: list[tuple[int, int]] = []

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: int) -> tuple[int, int]:
        return self.low_mw, self.high_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: int) -> int:
        return self.high_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: int, milliwatts: int) -> None:
        if not self.allow_set:
            raise AssertionError("the setter was called")
        if milliwatts == 123_000:
            raise RuntimeError("NVML_ERROR_NO_PERMISSION")
        self.set_calls.append((handle, milliwatts))


def test_capping_every_h100_to_half_gives_the_capped_dgx_h100_of_the_catalog() -> None:
    assert cap_range_of(H100) == CapRange(350.0, 700.0, 700.0)
    assert capped_machine(H100, 350.0).max_power_w == pytest.approx(
        BUILTIN_MACHINES["dgx-h100-cap"].max_power_w
    )
    assert capped_machine(H100, 700.0).max_power_w == pytest.approx(H100.rated_power_w)
    assert capped_machine(A100, 300.0).max_power_w < A100.rated_power_w


def test_a_cap_on_a_machine_without_gpus_is_its_whole_limit() -> None:
    assert capped_machine(CPU, 50.0).max_power_w == 50.0
    with pytest.raises(PowerCapError, match="outside its idle"):
        capped_machine(CPU, 10.0)
    with pytest.raises(PowerCapError, match="no GPUs"):
        cap_range_of(CPU)


def test_latency_under_a_cap_follows_the_splitwise_facts() -> None:
    assert latency_factor("prompt", 350.0, 700.0) == pytest.approx(1.30)
    assert latency_factor("prompt", 525.0, 700.0) == pytest.approx(1.15)
    assert latency_factor("prompt", 700.0, 700.0) == pytest.approx(1.0)
    assert latency_factor("token", 350.0, 700.0) == pytest.approx(1.0)
    assert latency_factor("prompt", 100.0, 700.0) == pytest.approx(1.30)  # no data below half: clamped


def test_token_nodes_with_slack_get_the_lowest_cap() -> None:
    decision = recommend_cap("token", predicted_s=0.030, target_s=0.0375, caps=H100_CAPS)
    assert decision.watts == 350.0
    assert decision.predicted_s == pytest.approx(0.030)
    assert "lowest cap allowed" in decision.reason


def test_prompt_nodes_get_the_lowest_cap_that_keeps_the_target() -> None:
    decision = recommend_cap("prompt", predicted_s=1.0, target_s=1.15, caps=H100_CAPS)
    assert decision.watts == pytest.approx(525.0)
    assert decision.predicted_s == pytest.approx(1.15)
    assert 1.0 * latency_factor("prompt", decision.watts - 1, 700.0) > 1.15  # one watt lower misses it
    assert "meets the target" in decision.reason
    assert recommend_cap("prompt", 1.0, 2.0, H100_CAPS).watts == 350.0


def test_a_node_without_slack_stays_at_its_highest_limit() -> None:
    decision = recommend_cap("token", predicted_s=0.050, target_s=0.040, caps=H100_CAPS)
    assert decision.watts == 700.0 and "no slack" in decision.reason


def test_recommend_refuses_meaningless_latencies() -> None:
    with pytest.raises(ValueError, match="> 0"):
        recommend_cap("token", 0.0, 0.04, H100_CAPS)


def test_nvml_constraints_give_the_range_floored_at_half_the_default_limit() -> None:
    assert cap_range_from_nvml(StandInNvml(), 0) == CapRange(350.0, 700.0, 700.0)
    assert cap_range_from_nvml(StandInNvml(low_mw=400_000), 0).min_w == 400.0


def test_a_dry_run_lists_the_setter_calls_and_makes_none() -> None:
    nvml = StandInNvml(gpus=2)
    calls = apply_cap(350.0, nvml)
    assert [(c.function, c.gpu_index, c.milliwatts) for c in calls] == [
        ("nvmlDeviceSetPowerManagementLimit", 0, 350_000),
        ("nvmlDeviceSetPowerManagementLimit", 1, 350_000),
    ]
    assert nvml.set_calls == []
    assert str(calls[0]) == "nvmlDeviceSetPowerManagementLimit(gpu 0, 350000 mW)"


def test_out_of_range_caps_are_refused_before_any_gpu_changes() -> None:
    nvml = StandInNvml(gpus=2, allow_set=True)
    with pytest.raises(PowerCapError, match=r"GPU 0: .* 800 W is outside its range 200\.\.700 W"):
        apply_cap(800.0, nvml, dry_run=False)
    with pytest.raises(PowerCapError, match="outside"):
        apply_cap(150.0, nvml, [1], dry_run=False)
    assert nvml.set_calls == []


def test_applying_sets_each_listed_gpu_and_reports_refusals() -> None:
    nvml = StandInNvml(gpus=4, allow_set=True)
    apply_cap(400.0, nvml, [1, 3], dry_run=False)
    assert nvml.set_calls == [(1, 400_000), (3, 400_000)]
    with pytest.raises(PowerCapError, match="NVML refused the cap: NVML_ERROR_NO_PERMISSION"):
        apply_cap(123.0, StandInNvml(low_mw=100_000, allow_set=True), [0], dry_run=False)
    with pytest.raises(PowerCapError, match="no GPU"):
        apply_cap(400.0, StandInNvml(gpus=0))


@pytest.mark.gpu
def test_a_dry_run_on_a_real_gpu_reads_its_range_and_changes_nothing() -> None:
    """On a machine with a GPU: the real NVML, dry runs only (our GPU machines' settings are never changed)."""
    nvml, why = load_nvml()
    assert nvml is not None, why
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        limit = nvml.nvmlDeviceGetPowerManagementLimit(handle)
        low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        [call] = apply_cap(low / 1000, nvml, [0], dry_run=True)
        assert call.milliwatts == low
        with pytest.raises(PowerCapError, match="outside its range"):
            apply_cap(high / 1000 + 1, nvml, [0], dry_run=True)
        assert nvml.nvmlDeviceGetPowerManagementLimit(handle) == limit
        assert cap_range_from_nvml(nvml, 0).max_w == high / 1000
    finally:
        nvml.nvmlShutdown()
