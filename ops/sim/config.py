"""How a simulation runs: the performance data, the model, the placement policy and machine-level limits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cluster.machines import MachineType

__all__ = ["FIDELITIES", "SimConfig"]

# How a cluster is modelled: "splitserve", ours (ops/sim/simulator.py); "splitwise-sim", the way Microsoft's
# SplitwiseSim models it (ops/sim/splitwise_sim/). docs/planning.md says where and why they differ.
FIDELITIES = ("splitserve", "splitwise-sim")


@dataclass(frozen=True)
class SimConfig:
    perf_csv: Path  # perf_model.csv, or a CSV `splitserve profile` wrote
    model: str = "bloom-176b"  # the CSV's model column
    tensor_parallel: int = 8  # GPUs per model instance; the CSV's tensor_parallel column
    policy: str = "jsq"  # a router.policy name
    catalog: Mapping[str, MachineType] | None = None  # None: cluster.machines.BUILTIN_MACHINES
    # Machine type -> the CSV's hardware column; a type not listed uses its catalog accelerator (dgx-a100 ->
    # a100-80gb, dgx-h100 -> h100-80gb, dgx-h100-cap -> h100-80gb-pcap, cpu -> cpu).
    hardware: Mapping[str, str] | None = None
    reference_hardware: str = "a100-80gb"  # SLO slowdowns are vs the request alone on this hardware
    max_batch_tokens: int = 2048  # prompt tokens per prefill batch (a longer prompt runs alone)
    max_batch_size: int = 512  # sequences in a decode batch
    # KV tokens one machine holds (split evenly over its model instances); None: from the model's size and the
    # machine's GPU memory (ops/sim/hardware.py).
    kv_capacity_tokens: int | None = None
    # Network bandwidth of one machine for KV transfers (split evenly over its instances); None: one InfiniBand
    # port per GPU at the accelerator's rate (ops/sim/hardware.py).
    link_gbps: float | None = None
    kv_bytes_per_token: int | None = None  # None: from the model's size (bloom-176b, llama2-70b)
    # Prompts shorter than this send their KV in one piece after the prompt; longer ones layer by layer (Splitwise).
    serialize_below_tokens: int = 512
    policy_options: Mapping[str, object] = field(
        default_factory=dict
    )  # router.policies.create_policy(**options)
    # The serving system's own latency per request before its prompt starts (placement, the reservation and the
    # RPC hops), which performance models of the engine do not contain; 0 for Splitwise's simulator. Measure it
    # on a real cluster as the TTFT of a request alone minus its prompt time.
    request_overhead_s: float = 0.0
    # Likewise per decode iteration: the serving system's time beyond the engine step (streaming each token out
    # through the router), added to every iteration that decodes; 0 for Splitwise's simulator. Measure it on a real
    # cluster as the time between tokens of a request alone minus the performance model's batch-1 token time.
    iteration_overhead_s: float = 0.0
    fidelity: str = "splitserve"  # one of FIDELITIES

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {', '.join(FIDELITIES)}, got {self.fidelity!r}")
        object.__setattr__(self, "perf_csv", Path(self.perf_csv))
        for name in ("tensor_parallel", "max_batch_tokens", "max_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("kv_capacity_tokens", "kv_bytes_per_token"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("serialize_below_tokens", self.serialize_below_tokens, minimum=0)
        for name in ("request_overhead_s", "iteration_overhead_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.link_gbps is not None and not (
            isinstance(self.link_gbps, int | float) and math.isfinite(self.link_gbps) and self.link_gbps > 0
        ):
            raise ValueError(f"link_gbps must be a finite number > 0, got {self.link_gbps!r}")

    def hardware_of(self, machine: MachineType) -> str:
        """The perf-CSV hardware that times this machine type."""
        if self.hardware is not None and machine.name in self.hardware:
            return self.hardware[machine.name]
        return machine.accelerator


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
