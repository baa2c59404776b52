"""`splitserve simulate`: a discrete-event simulator of a phase-split (or colocated) cluster.

It runs the router's own placement policies (router.policy) over Splitwise's performance model (cluster.perfmodel)
with machine-level batching, KV transfers and modeled power, on Azure-format traces; see simulator.py for a
request's life, node.py for a machine's, hardware.py for the assumptions and result.py for the accounting.
SimConfig(fidelity="splitwise-sim") runs SplitwiseSim's model instead (splitwise_sim/). Torch-free, like the router.
"""

from ops.sim.config import SimConfig
from ops.sim.design import DESIGNS, ClusterDesign, Pool, make_design
from ops.sim.result import SimResult
from ops.sim.simulator import simulate

__all__ = ["DESIGNS", "ClusterDesign", "Pool", "SimConfig", "SimResult", "make_design", "simulate"]
