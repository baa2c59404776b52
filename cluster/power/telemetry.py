"""What a node's machine draws right now, always labelled with where the figure came from.

- `NvmlPowerMeter` ("measured"): the board power of the node's GPUs from NVML (`nvidia-ml-py`). It covers the GPUs
  only, not the host; a reading is reused for `NVML_READ_INTERVAL_S` because accounting asks once per engine step.
- `ModeledPowerMeter` ("modeled"): the machine type's linear power model (cluster.machines.power_model) at the node's
  utilisation, the fraction of the last `window_s` seconds that the engine spent inside step().

`create_meter` picks NVML only when the node runs on CUDA, `pynvml` imports, NVML initialises and sees a GPU;
otherwise (a CPU node, no driver, no library) it falls back to the model and says why in `description`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cluster.machines import MachineType, PowerReading, PowerSource, modeled_reading

DEFAULT_WINDOW_S = 1.0
NVML_READ_INTERVAL_S = 0.05
Clock = Callable[[], float]


class PowerMeter(Protocol):
    source: PowerSource
    description: str  # one line for the node's log: which meter, and why this one

    def read(self) -> PowerReading: ...

    def close(self) -> None: ...


class UtilisationWindow:
    """The fraction of the last `window_s` seconds spent busy, from busy intervals reported as they end.

    Thread-safe: the engine thread records, the load publisher and the accounting read. Intervals must not overlap
    (one engine steps at a time), which keeps the sum a plain running total."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, clock: Clock = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._created = clock()
        self._intervals: deque[tuple[float, float]] = deque()  # (start, end), oldest first
        self._busy_s = 0.0  # total length of the intervals held
        self._lock = threading.Lock()

    def record_busy(self, started_s: float, wall_s: float) -> None:
        if wall_s < 0:
            raise ValueError(f"a busy interval cannot be negative, got {wall_s} s")
        with self._lock:
            self._intervals.append((started_s, started_s + wall_s))
            self._busy_s += wall_s

    def utilisation(self) -> float:
        now = self._clock()
        start = now - self.window_s
        with self._lock:
            while self._intervals and self._intervals[0][1] <= start:
                first, last = self._intervals.popleft()
                self._busy_s -= last - first
            busy = self._busy_s
            if self._intervals:  # the oldest interval may straddle the window's start
                busy -= max(0.0, start - self._intervals[0][0])
        # Just after start-up the window reaches back before the node existed: divide by the time it did.
        span = min(self.window_s, max(now - self._created, 1e-9))
        return min(1.0, max(0.0, busy / span))


class ModeledPowerMeter:
    source: PowerSource = "modeled"

    def __init__(self, machine: MachineType, window: UtilisationWindow, why: str = "") -> None:
        self.machine = machine
        self.window = window
        self.description = f"modeled power of {machine.name} from engine utilisation" + (
            f" ({why})" if why else ""
        )

    def read(self) -> PowerReading:
        return modeled_reading(self.machine, self.window.utilisation())

    def close(self) -> None:
        pass


class NvmlPowerMeter:
    source: PowerSource = "measured"

    def __init__(
        self,
        nvml: Any,
        gpu_indices: Sequence[int],
        min_interval_s: float = NVML_READ_INTERVAL_S,
        clock: Clock = time.monotonic,
    ) -> None:
        if not gpu_indices:
            raise ValueError("an NVML meter needs at least one GPU")
        self.nvml = nvml  # the initialised pynvml module (or a stand-in with its function names)
        self.gpu_indices = list(gpu_indices)  # NVML's numbering
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in gpu_indices]
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last: tuple[float, PowerReading] | None = None
        self._lock = threading.Lock()
        self.description = f"NVML board power of GPU(s) {list(gpu_indices)} (host power not included)"

    def read(self) -> PowerReading:
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last[0] < self._min_interval_s:
                return self._last[1]
            try:
                milliwatts = sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles)
            except Exception:  # a transient NVML error: keep the last reading rather than stop the engine
                if self._last is None:
                    raise
                return self._last[1]
            reading = PowerReading(milliwatts / 1000.0, "measured")
            self._last = (now, reading)
            return reading

    def close(self) -> None:
        with contextlib.suppress(Exception):  # NVML's own error types; nothing to do about them at exit
            self.nvml.nvmlShutdown()


def load_nvml() -> tuple[Any | None, str]:
    """The initialised `pynvml` module, or None and the reason it is not usable here."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and its many subclasses (no driver, no library)
        return None, f"NVML did not initialise: {exc}"
    return pynvml, ""


def nvml_gpu_index(nvml: Any, device: str, visible: str | None = None) -> int:
    """NVML's index of the GPU behind a torch device name ("cuda", "cuda:N").

    CUDA numbers the devices CUDA_VISIBLE_DEVICES lists (indices or UUIDs); NVML numbers all of the machine's. As
    everywhere with NVML, this assumes CUDA_DEVICE_ORDER=PCI_BUS_ID when CUDA_VISIBLE_DEVICES is unset."""
    _, _, suffix = device.partition(":")
    cuda_index = int(suffix) if suffix else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return cuda_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        raise ValueError(f"{device}: CUDA_VISIBLE_DEVICES={visible!r} lists only {len(entries)} device(s)")
    entry = entries[cuda_index]
    if entry.isdigit():
        return int(entry)
    return int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(entry)))


def create_meter(
    machine: MachineType,
    device: str,
    window: UtilisationWindow,
    nvml_loader: Callable[[], tuple[Any | None, str]] = load_nvml,
) -> PowerMeter:
    """NVML on a CUDA node that can use it, the machine type's power model otherwise."""
    if not device.startswith("cuda"):
        return ModeledPowerMeter(machine, window, f"the node runs on {device}")
    nvml, why = nvml_loader()
    if nvml is None:
        return ModeledPowerMeter(machine, window, why)
    try:
        if nvml.nvmlDeviceGetCount() < 1:
            nvml.nvmlShutdown()
            return ModeledPowerMeter(machine, window, "NVML sees no GPU")
        return NvmlPowerMeter(nvml, [nvml_gpu_index(nvml, device)])
    except Exception as exc:  # NVML errors or a device name NVML cannot map: model rather than fail
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
        return ModeledPowerMeter(machine, window, f"NVML cannot read {device}: {exc}")
