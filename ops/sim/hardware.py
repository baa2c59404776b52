"""What the simulator assumes about models and machines beyond the perf CSV: KV sizes, memory, links, power.

Models (bf16, 2 bytes per value; KV per token = 2 (K and V) x layers x KV width x 2 bytes):
  bloom-176b   176e9 parameters, 70 layers, hidden 14336, multi-head attention (KV width 14336): 4.01 MB/token
  llama2-70b    70e9 parameters, 80 layers, 8 KV heads x 128 (grouped-query attention):           0.33 MB/token
Any other model needs `kv_bytes_per_token` (for KV transfers) and `kv_capacity_tokens` given explicitly.

Model instances: one instance spans `tensor_parallel` GPUs, and a machine with G GPUs holds G // tensor_parallel
instances, each simulated as its own node with its share of the machine's cost, power and network links (so
llama2-70b at TP 2 is four nodes per DGX). A machine without accelerators (the "cpu" type) holds one instance.

KV capacity of an instance: GPU_MEMORY_UTILISATION of its GPUs' memory (what vLLM reserves by default; the rest
is activations and runtime) minus the weights, divided by the KV bytes per token. GPU memory is read from the
accelerator name ("a100-80gb" -> 80 GB). BLOOM-176B at TP 8 on a DGX: 0.9 x 640 GB - 352 GB = 224 GB, ~55,800 tokens.

Links: splitwise-facts.md Table I gives InfiniBand 200 Gbps (A100) and 400 Gbps (H100); a DGX has one such port per
GPU (8 x 200 Gbps HDR on DGX-A100, 8 x 400 Gbps NDR on DGX-H100) and every tensor-parallel shard sends its own KV
slice, so an instance gets tensor_parallel ports. This gives 200 GB/s per DGX-A100, the order of the Splitwise
simulator's 200 GiB/s default, and a transfer of < 7% of the prompt's compute for BLOOM (the paper's figure).
Other accelerators have no default: give `link_gbps`.

Layer-wise transfer leaves a constant not hidden by compute: ~8 ms on A100, ~5 ms on H100 (splitwise-facts.md,
"KV-cache transfer"); unknown accelerators get 0 beyond the part of the transfer that outlasts the compute.

Power by phase (whole machine, split evenly across its instances):
  idle       MachineType.idle_power_w
  prompt     MachineType.max_power_w: prefill is compute-bound and runs at the rating, or at the cap when capped
             (the CSV's peak_power is ~1.0 of the rating for A100)
  token      token_power_fraction x rated power, kept between idle and max: the CSV's average_power is the median
             fraction of rated power over runs dominated by the token phase (0.63 for A100). Only A100 rows carry
             power, so other hardware uses the reference hardware's fraction, else DEFAULT_TOKEN_POWER_FRACTION.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cluster.machines import MachineType

BYTES_PER_VALUE = 2  # bf16
GPU_MEMORY_UTILISATION = 0.9
# A100 rows of perf_model.csv give 0.63; used only when no group of the CSV carries power.
DEFAULT_TOKEN_POWER_FRACTION = 0.63
# Per-GPU network port, Gbps, by accelerator (splitwise-facts.md Table I; the capped H100 has the same NICs).
PORT_GBPS = {"a100-80gb": 200.0, "h100-80gb": 400.0, "h100-80gb-pcap": 400.0}
# Time a layer-wise KV transfer leaves after the prompt's compute, s (splitwise-facts.md, "KV-cache transfer").
LAYERWISE_RESIDUAL_S = {"a100-80gb": 0.008, "h100-80gb": 0.005, "h100-80gb-pcap": 0.005}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    parameters: float
    layers: int
    kv_width: int  # KV heads x head size (hidden size for multi-head attention)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_width * BYTES_PER_VALUE

    @property
    def weight_bytes(self) -> float:
        return self.parameters * BYTES_PER_VALUE


MODELS = {
    "bloom-176b": ModelSpec(176e9, 70, 14336),
    "llama2-70b": ModelSpec(70e9, 80, 8 * 128),
}


def model_spec(model: str) -> ModelSpec:
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(
            f"no size known for model {model!r} (known: {', '.join(MODELS)}); "
            "give kv_bytes_per_token and kv_capacity_tokens"
        ) from None


def instances_per_machine(machine: MachineType, tensor_parallel: int) -> int:
    if machine.gpus == 0:
        return 1
    if machine.gpus < tensor_parallel:
        raise ValueError(
            f"machine type {machine.name!r} has {machine.gpus} GPUs, fewer than tensor_parallel={tensor_parallel}"
        )
    return machine.gpus // tensor_parallel


def gpu_memory_gb(accelerator: str) -> int:
    """The N of an accelerator named "...-Ngb"; ValueError when the name does not tell."""
    match = re.search(r"(\d+)gb", accelerator)
    if match is None:
        raise ValueError(
            f"cannot tell the memory of accelerator {accelerator!r} from its name; give kv_capacity_tokens"
        )
    return int(match.group(1))


def gpu_memory_bytes(accelerator: str) -> float:
    return gpu_memory_gb(accelerator) * 1e9


def kv_capacity_tokens(model: str, machine: MachineType, tensor_parallel: int) -> int:
    """Tokens of KV one model instance holds, from the model's size and its GPUs' memory."""
    spec = model_spec(model)
    gpus = tensor_parallel if machine.gpus else 0
    free = GPU_MEMORY_UTILISATION * gpus * gpu_memory_bytes(machine.accelerator) - spec.weight_bytes
    tokens = int(free // spec.kv_bytes_per_token)
    if tokens < 1:
        raise ValueError(
            f"{model} does not fit on {tensor_parallel} GPUs of machine type {machine.name!r} "
            "with room for KV; use a larger tensor_parallel or give kv_capacity_tokens"
        )
    return tokens


def instance_link_gbps(machine: MachineType, tensor_parallel: int) -> float:
    """Default network bandwidth of one model instance: one port per tensor-parallel GPU."""
    try:
        return PORT_GBPS[machine.accelerator] * tensor_parallel
    except KeyError:
        raise ValueError(
            f"no default link bandwidth for machine type {machine.name!r} "
            f"(accelerator {machine.accelerator!r}); give link_gbps"
        ) from None


def token_power_w(machine: MachineType, fraction: float) -> float:
    """Whole-machine draw while decoding: `fraction` of the rating, between idle and the maximum."""
    return min(machine.max_power_w, max(machine.idle_power_w, fraction * machine.rated_power_w))
