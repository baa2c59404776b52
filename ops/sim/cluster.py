"""Turning a design into simulated nodes and the placement arrays the router's policies read.

Each pool machine becomes tensor-parallel model instances (ops/sim/hardware.py), each a node named after its pool
and machine: "prefill-3", or "decode-1.2" (machine 1, instance 2) when a machine holds several instances. The nodes of
a role share one RoleArrays, filled once with the static columns (cost, power, PerfSummary lines) and updated in
place by the nodes as their load changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.machines import MachineType
from ops.sim import hardware
from ops.sim.config import SimConfig
from ops.sim.design import ClusterDesign, machine_type
from ops.sim.node import NodeSpec
from ops.sim.timing import BatchTimer
from router.cluster_index import ROLES, RoleArrays

__all__ = ["build_specs", "role_arrays"]


def build_specs(
    design: ClusterDesign,
    config: SimConfig,
    catalog: Mapping[str, MachineType],
    timers: Mapping[str, BatchTimer],
) -> dict[str, list[NodeSpec]]:
    """Role -> the node specs of its pool, in machine order (every role present, possibly empty)."""
    needs_links = design.prefill is not None
    fallback_fraction = _token_power_fraction(config, timers)
    specs: dict[str, list[NodeSpec]] = {role: [] for role in ROLES}
    for role, pool in design.pools():
        machine = machine_type(pool.machine_type, catalog)
        hw = config.hardware_of(machine)
        instances = hardware.instances_per_machine(machine, config.tensor_parallel)
        capacity = _kv_capacity(config, machine, instances)
        link = _link_bytes_per_s(config, machine, instances) if needs_links else 0.0
        token_fraction = timers[hw].model.average_power_fraction or fallback_fraction
        for m in range(pool.count):
            for j in range(instances):
                node_id = f"{role}-{m}" if instances == 1 else f"{role}-{m}.{j}"
                specs[role].append(
                    NodeSpec(
                        node_id=node_id,
                        machine_type=machine.name,
                        hardware=hw,
                        kv_capacity=capacity,
                        link_bytes_per_s=link,
                        layerwise_residual_s=hardware.LAYERWISE_RESIDUAL_S.get(machine.accelerator, 0.0),
                        idle_w=machine.idle_power_w / instances,
                        prompt_w=machine.max_power_w / instances,
                        token_w=hardware.token_power_w(machine, token_fraction) / instances,
                        cost_per_s=machine.cost_per_hour / 3600.0 / instances,
                    )
                )
    return specs


def role_arrays(specs: list[NodeSpec], timers: Mapping[str, BatchTimer]) -> RoleArrays:
    """A role's placement arrays at rest: every node idle, its KV free."""
    lines = [timers[spec.hardware].model.summary() for spec in specs]
    return RoleArrays.build(
        [spec.node_id for spec in specs],
        free_blocks=[spec.kv_capacity for spec in specs],
        block_size=[1] * len(specs),  # the simulator counts KV in tokens
        cost_per_s=[spec.cost_per_s for spec in specs],
        idle_power_w=[spec.idle_w for spec in specs],
        max_power_w=[spec.prompt_w for spec in specs],
        power_w=[spec.idle_w for spec in specs],
        prompt_fixed_s=[line.prompt_fixed_s for line in lines],
        prompt_per_token_s=[line.prompt_per_token_s for line in lines],
        token_fixed_s=[line.token_fixed_s for line in lines],
        token_per_seq_s=[line.token_per_seq_s for line in lines],
    )


def _kv_capacity(config: SimConfig, machine: MachineType, instances: int) -> int:
    if config.kv_capacity_tokens is None:
        return hardware.kv_capacity_tokens(config.model, machine, config.tensor_parallel)
    capacity = config.kv_capacity_tokens // instances
    if capacity < 1:
        raise ValueError(
            f"kv_capacity_tokens={config.kv_capacity_tokens} leaves no KV for {instances} instances"
        )
    return capacity


def _link_bytes_per_s(config: SimConfig, machine: MachineType, instances: int) -> float:
    if config.link_gbps is None:
        gbps = hardware.instance_link_gbps(machine, config.tensor_parallel)
    else:
        gbps = config.link_gbps / instances
    return gbps * 1e9 / 8


def _token_power_fraction(config: SimConfig, timers: Mapping[str, BatchTimer]) -> float:
    """The decode-phase power fraction for hardware the CSV has no power for: the reference's, else any group's."""
    reference = timers.get(config.reference_hardware)
    if reference is not None and reference.model.average_power_fraction is not None:
        return reference.model.average_power_fraction
    measured = [t.model.average_power_fraction for t in timers.values() if t.model.average_power_fraction]
    return measured[0] if measured else hardware.DEFAULT_TOKEN_POWER_FRACTION
