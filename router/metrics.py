"""The router's Prometheus metrics, served as text at GET /metrics on its HTTP port.

One registry per router (not prometheus_client's global one), so several routers or services in one process
never share counts. What it exports:
- splitserve:request_energy_joules{phase} and splitserve:request_cost_usd{phase}: histograms of what each finished
  request was charged per phase (prefill, transfer, decode; ops/power/accounting.py says how nodes charge). Their
  _count is the number of finished requests, their _sum the total energy and cost of them.
- splitserve:node_power_watts{node, role, machine_type, source}: each live node's latest reported power, read from
  the router's cluster view at scrape time; idle power shows here, since requests are charged only for the machine
  time they used.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ops.cluster_state import ClusterView
from splitserve.v1 import inference_pb2 as pb

PHASES = ("prefill", "transfer", "decode")
# Splitwise's Table IV puts one Llama2-70B request at 1.4-9.4 Wh (5-34 kJ); tiny CPU models use a few joules.
ENERGY_BUCKETS_J = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
COST_BUCKETS_USD = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
NODE_POWER = "splitserve:node_power_watts"


class RouterMetrics:
    def __init__(self, view: ClusterView | None = None) -> None:
        self.registry = CollectorRegistry()
        self.request_energy = Histogram(
            "splitserve:request_energy_joules",
            "Energy charged to each finished request, by phase (J)",
            ["phase"],
            registry=self.registry,
            buckets=ENERGY_BUCKETS_J,
        )
        self.request_cost = Histogram(
            "splitserve:request_cost_usd",
            "Cost charged to each finished request, by phase (USD)",
            ["phase"],
            registry=self.registry,
            buckets=COST_BUCKETS_USD,
        )
        if view is not None:
            self.registry.register(_NodePower(view))

    def observe_usage(self, usage: pb.Usage) -> None:
        """A request finished with this usage (the router's sum over its nodes)."""
        for phase in PHASES:
            self.request_energy.labels(phase).observe(getattr(usage.charges, f"{phase}_energy_joules"))
            self.request_cost.labels(phase).observe(getattr(usage.charges, f"{phase}_cost_usd"))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _NodePower:
    """A collector that reads the cluster view when scraped, so the gauge always shows the live nodes only."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for node in self.view.nodes():
            if node.load is not None:
                info = node.info
                labels = [info.node_id, info.role, info.machine_type, node.load.power_source]
                family.add_metric(labels, node.load.power_w)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            NODE_POWER,
            "Latest power reported by each live node (W), measured (NVML) or modeled",
            labels=["node", "role", "machine_type", "source"],
        )
