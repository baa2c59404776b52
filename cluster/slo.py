"""The Splitwise paper's SLOs (Patel et al., ISCA 2024, Table VI; shared/design/splitwise-facts.md, "SLOs").

Stated as slowdowns: a request's latency under load divided by the same request's latency when it runs alone. The
P50, P90 and P99 over requests of the TTFT, TBT and E2E slowdowns must all stay within these limits. One definition
for every user: the load tester's 9-SLO check (ops/bench/slo.py), the simulator's results, and a node's power-cap
recommendation (cluster/power/node_power.py).
"""

from __future__ import annotations

from typing import Literal

SloMetric = Literal["ttft", "tbt", "e2e"]
# (metric, percentile) -> the largest slowdown allowed; Splitwise Table VI.
SPLITWISE_SLO_LIMITS: dict[tuple[SloMetric, int], float] = {
    ("ttft", 50): 2.0,
    ("ttft", 90): 3.0,
    ("ttft", 99): 6.0,
    ("tbt", 50): 1.25,
    ("tbt", 90): 1.5,
    ("tbt", 99): 5.0,
    ("e2e", 50): 1.25,
    ("e2e", 90): 1.5,
    ("e2e", 99): 5.0,
}
