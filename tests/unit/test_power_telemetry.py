"""Power meters (cluster/power/telemetry.py): the utilisation window, modeled readings, and which meter a node gets.

This machine has no GPU and no NVML library. Where a test needs NVML it passes `FakeNvml`, an object with pynvml's
function names standing in for hardware that cannot exist here; it has no setter, so nothing could be changed."""

from __future__ import annotations

import pytest

from cluster.machines import BUILTIN_MACHINES, power_model
from cluster.power.telemetry import (
    ModeledPowerMeter,
    NvmlPowerMeter,
    UtilisationWindow,
    create_meter,
    load_nvml,
    nvml_gpu_index,
)

H100 = BUILTIN_MACHINES["dgx-h100"]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeNvml:
    """pynvml's reading functions over made-up GPUs (see the module docstring)."""

    def __init__(self, milliwatts: list[int]) -> None:
        self.milliwatts = milliwatts
        self.reads = 0
        self.failing = False
        self.shut_down = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.milliwatts)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if self.failing:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        self.reads += 1
        return self.milliwatts[handle]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return {"GPU-aaaa": 3, "GPU-bbbb": 5}[handle]

    def nvmlShutdown(self) -> None:
        self.shut_down = True


def window_at(clock: Clock, window_s: float = 1.0) -> UtilisationWindow:
    clock.now -= 10.0  # created long ago, so the whole window counts
    window = UtilisationWindow(window_s, clock=clock)
    clock.now += 10.0
    return window


def test_utilisation_is_the_busy_fraction_of_the_last_window() -> None:
    clock = Clock()
    window = window_at(clock)
    assert window.utilisation() == 0.0
    window.record_busy(clock.now - 0.9, 0.3)
    window.record_busy(clock.now - 0.4, 0.2)
    assert window.utilisation() == pytest.approx(0.5)
    clock.now += 0.3  # the first interval now straddles the window's start: only 0.1 s of it is inside
    assert window.utilisation() == pytest.approx(0.3)
    clock.now += 5.0
    assert window.utilisation() == 0.0


def test_a_young_window_divides_by_the_time_it_has_existed() -> None:
    clock = Clock()
    window = UtilisationWindow(2.0, clock=clock)
    clock.now += 0.5
    window.record_busy(clock.now - 0.25, 0.25)
    assert window.utilisation() == pytest.approx(0.5)


def test_a_modeled_meter_follows_utilisation_and_says_it_is_modeled() -> None:
    clock = Clock()
    window = window_at(clock)
    meter = ModeledPowerMeter(H100, window)
    idle = meter.read()
    assert idle.source == "modeled" and idle.watts == pytest.approx(H100.idle_power_w)
    window.record_busy(clock.now - 1.0, 1.0)
    assert meter.read().watts == pytest.approx(H100.rated_power_w)
    window.record_busy(clock.now, 0.0)
    clock.now += 0.5
    assert meter.read().watts == pytest.approx(power_model(H100, 0.5))


def test_a_cpu_node_gets_the_model_without_looking_for_nvml() -> None:
    def loader() -> tuple[object, str]:
        raise AssertionError("a CPU node must not initialise NVML")

    meter = create_meter(H100, "cpu", UtilisationWindow(), nvml_loader=loader)
    assert meter.source == "modeled" and "runs on cpu" in meter.description


def test_a_cuda_node_without_nvml_falls_back_to_the_model_and_says_why() -> None:
    nvml, why = load_nvml()
    if nvml is not None:
        nvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    meter = create_meter(H100, "cuda:0", UtilisationWindow())
    assert meter.source == "modeled" and why in meter.description


def test_a_cuda_node_whose_nvml_sees_no_gpu_falls_back_to_the_model() -> None:
    fake = FakeNvml([])
    meter = create_meter(H100, "cuda", UtilisationWindow(), nvml_loader=lambda: (fake, ""))
    assert meter.source == "modeled" and "no GPU" in meter.description and fake.shut_down


def test_a_cuda_node_with_nvml_measures_its_own_gpu() -> None:
    fake = FakeNvml([100_000, 250_500])
    meter = create_meter(H100, "cuda:1", UtilisationWindow(), nvml_loader=lambda: (fake, ""))
    assert isinstance(meter, NvmlPowerMeter)
    reading = meter.read()
    assert reading.source == "measured" and reading.watts == pytest.approx(250.5)
    meter.close()
    assert fake.shut_down


def test_nvml_readings_are_reused_briefly_and_survive_a_transient_error() -> None:
    clock = Clock()
    fake = FakeNvml([300_000])
    meter = NvmlPowerMeter(fake, [0], min_interval_s=0.05, clock=clock)
    meter.read()
    fake.milliwatts[0] = 400_000
    assert meter.read().watts == 300.0 and fake.reads == 1  # within the interval: the cached reading
    clock.now += 0.1
    assert meter.read().watts == 400.0
    fake.failing = True
    clock.now += 0.1
    assert meter.read().watts == 400.0  # the last good reading
    with pytest.raises(RuntimeError):
        NvmlPowerMeter(fake, [0], clock=clock).read()  # nothing to fall back on


def test_cuda_devices_map_to_nvml_indices_through_cuda_visible_devices() -> None:
    fake = FakeNvml([0] * 8)
    assert nvml_gpu_index(fake, "cuda", visible="") == 0
    assert nvml_gpu_index(fake, "cuda:2", visible="") == 2
    assert nvml_gpu_index(fake, "cuda:1", visible="6,7") == 7
    assert nvml_gpu_index(fake, "cuda:0", visible="GPU-bbbb,GPU-aaaa") == 5
    with pytest.raises(ValueError, match="lists only 2"):
        nvml_gpu_index(fake, "cuda:2", visible="6,7")


@pytest.mark.gpu
def test_a_cuda_node_reads_its_gpu_board_power_through_nvml() -> None:
    """On a machine with a GPU: the real NVML, read only."""
    meter = create_meter(H100, "cuda:0", UtilisationWindow())
    try:
        assert meter.source == "measured", meter.description
        assert 0 < meter.read().watts < 2000
    finally:
        meter.close()
