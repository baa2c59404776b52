"""`--fidelity splitwise-sim`: the cluster simulated the way Microsoft's SplitwiseSim (Mutinifni/splitwise-sim, the
Splitwise paper's simulator) models it, so that our planner's answers can be checked against the paper's tool.

Written from SplitwiseSim's documented behaviour and source (MIT), not copied: its database performance model
(perf.py), its event loop's ordering (events.py), its requests and memory accounting (work.py), its "Splitwise"
instance (instance.py), its mixed_pool and token_jsq schedulers (schedulers.py) and its KV transfer and latency
definitions (run.py). docs/planning.md lists where this model and our default one differ, with the evidence for
each choice; benchmarks/sim_vs_splitwisesim.py runs both simulators side by side.
"""

from ops.sim.splitwise_sim.run import simulate_splitwise_sim, splitwise_slo_check

__all__ = ["simulate_splitwise_sim", "splitwise_slo_check"]
