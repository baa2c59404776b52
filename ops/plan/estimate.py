"""A first guess of the rate a configuration sustains, to start each rate search near its answer.

Only a starting point (the search brackets and bisects from it), so it is deliberately rough: a prefill machine
runs full 2048-token batches, a decode machine runs batches of GUESS_DECODE_BATCH, a colocated machine splits its
time between the two, and SLOs bind at half the saturation rate. Loading the perf model here also checks, before
any simulation, that the CSV measures every hardware the designs use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster.machines import MachineType
from cluster.perfmodel import PerfModel
from ops.plan.designs import Config, DesignSpec
from ops.plan.pricing import catalog_entry

GUESS_DECODE_BATCH = 32  # sequences; between light load and KV-bound batches of the 176B model
GUESS_LOAD_FRACTION = 0.5  # latency SLOs are usually met up to about half the saturation rate


@dataclass(frozen=True, slots=True)
class MachineCapacity:
    prefill_rps: float  # requests/s one machine prefills at full batches
    decode_rps: float  # requests/s one machine completes decoding


class CapacityGuess:
    def __init__(self, capacities: Mapping[str, MachineCapacity]) -> None:
        self._capacities = dict(capacities)

    @classmethod
    def from_perf_models(
        cls,
        models: Mapping[str, PerfModel],
        mean_prompt_tokens: float,
        mean_output_tokens: float,
        max_batch_tokens: int,
    ) -> CapacityGuess:
        capacities = {}
        for machine_type, model in models.items():
            prefill_tokens_per_s = max_batch_tokens / model.prompt_time_s(max_batch_tokens)
            decode_tokens_per_s = GUESS_DECODE_BATCH / model.token_time_s(GUESS_DECODE_BATCH)
            capacities[machine_type] = MachineCapacity(
                prefill_tokens_per_s / max(1.0, mean_prompt_tokens),
                decode_tokens_per_s / max(1.0, mean_output_tokens),
            )
        return cls(capacities)

    def rps(self, spec: DesignSpec, config: Config) -> float:
        if spec.colocated_type is not None:
            one = self._capacities[spec.colocated_type]
            per_machine = 1.0 / (1.0 / one.prefill_rps + 1.0 / one.decode_rps)
            return GUESS_LOAD_FRACTION * config.colocated * per_machine
        assert spec.prefill_type is not None and spec.decode_type is not None
        prefill = config.prefill * self._capacities[spec.prefill_type].prefill_rps
        decode = config.decode * self._capacities[spec.decode_type].decode_rps
        return GUESS_LOAD_FRACTION * min(prefill, decode)


def load_perf_models(
    perf_csv: str,
    model: str,
    tensor_parallel: int,
    machine_types: Iterable[str],
    catalog: Mapping[str, MachineType],
    hardware_of: Mapping[str, str],
) -> dict[str, PerfModel]:
    """One PerfModel per machine type; ValueError naming the groups the CSV has when one is missing."""
    models: dict[str, PerfModel] = {}
    for machine_type in machine_types:
        catalog_entry(catalog, machine_type)
        models[machine_type] = PerfModel.from_csv(perf_csv, model, hardware_of[machine_type], tensor_parallel)
    return models
