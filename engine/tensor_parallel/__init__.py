"""Tensor parallelism: one model split over N processes, driven by one engine (`EngineConfig.tensor_parallel`).

- plan.py: which heads, columns and vocabulary rows each rank holds, and the checks that the model divides;
- comm.py: the collectives (all-reduce, all-gather, a step's broadcast) over gloo groups of the engine's own;
- engine/tp_ranks.py (beside this package, since it builds whole models): rank 0 (the engine's process) spawns
  ranks 1..N-1, announces each step to them, stops them.
- kv_resharding.py: the prefill and decode roles' transfer pool (every KV head, on rank 0), through which nodes lend
  prefix blocks and reach peers without ranks, kept in step with the ranks' pools;
- rank_calls.py: what else each worker rank runs over its pool, loaded by name (a KV transport of its own, through
  which prompts' KV goes rank to rank: cluster/node/rank_kv.py), and rank 0's calls to it.
Each rank keeps a KV pool of its own KV heads with the same block ids as rank 0's, so the scheduler's block tables
hold on every rank. Only rank 0 samples.
"""

from engine.tensor_parallel.comm import CollectiveFailed, TPComm
from engine.tensor_parallel.plan import TPPlan

__all__ = ["CollectiveFailed", "TPComm", "TPPlan"]
