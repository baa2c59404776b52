"""The router's Prometheus metrics, served as text at GET /metrics on its HTTP port.

One registry per router (not prometheus_client's global one), so several routers or services in one process
never share counts. What it exports:
- splitserve:request_energy_joules{phase} and splitserve:request_cost_usd{phase}: histograms of what each finished
  request was charged per phase (prefill, transfer, decode; cluster/power/accounting.py says how nodes charge). Their
  _count is the number of finished requests, their _sum the total energy and cost of them.
- splitserve:node_power_watts{node, role, machine_type, source}: each live node's latest reported power, read from
  the router's cluster view at scrape time; idle power shows here, since requests are charged only for the machine
  time they used.
- splitserve:time_to_first_token_seconds, splitserve:inter_token_latency_seconds (each gap between tokens as the
  client receives them), splitserve:e2e_request_latency_seconds: histograms labelled {model, route}, route "pair"
  (a prefill node and a decode node) or "colocated" (one node ran the whole request), as measured at the router.
- splitserve:requests_total{model, outcome}: placed requests by outcome, "ok" or the gRPC status of the failure.
- splitserve:retries_total{blamed}: attempts abandoned and placed again, by what was blamed: "node" (it failed or
  left the cluster) or "link" (a prefill node could not write into its decode node).
Each node serves its own metrics too (cluster/node/metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from cluster.state import ClusterView
from splitserve.v1 import inference_pb2 as pb

PHASES = ("prefill", "transfer", "decode")
# Splitwise's Table IV puts one Llama2-70B request at 1.4-9.4 Wh (5-34 kJ); tiny CPU models use a few joules.
ENERGY_BUCKETS_J = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
COST_BUCKETS_USD = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
NODE_POWER = "splitserve:node_power_watts"
# Latency buckets (s): CPU test models answer in milliseconds, Splitwise's 70B targets are ~0.1 s TBT and ~1 s TTFT.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


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
        latency = ["model", "route"]
        self.ttft = Histogram(
            "splitserve:time_to_first_token_seconds",
            "Time from a request's arrival at the router to its first token reaching the client (s)",
            latency,
            registry=self.registry,
            buckets=TTFT_BUCKETS_S,
        )
        self.inter_token = Histogram(
            "splitserve:inter_token_latency_seconds",
            "Gap between consecutive tokens of a request as the router relays them (s)",
            latency,
            registry=self.registry,
            buckets=ITL_BUCKETS_S,
        )
        self.e2e = Histogram(
            "splitserve:e2e_request_latency_seconds",
            "Time from a request's arrival at the router to its last token (s)",
            latency,
            registry=self.registry,
            buckets=E2E_BUCKETS_S,
        )
        self.requests = Counter(
            "splitserve:requests",
            "Placed requests by outcome: ok, or the gRPC status the client got",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "splitserve:retries",
            "Attempts abandoned and placed again, by what was blamed: node, or link (prefill to decode)",
            ["blamed"],
            registry=self.registry,
        )
        if view is not None:
            self.registry.register(_NodePower(view))

    def retried(self, blamed: str) -> None:
        self.retries.labels(blamed).inc()

    def request_failed(self, model: str, code: grpc.StatusCode) -> None:
        self.requests.labels(model, code.name.lower()).inc()

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


class RequestTimer:
    """One request's latency as the client sees it, told to the router's histograms as its tokens are relayed.

    `route` is set at each placement (a retry may move a request that has no token yet from a pair to a colocated
    node); the first token's route labels all of the request's observations from then on."""

    def __init__(self, metrics: RouterMetrics, model: str, arrived: float) -> None:
        self.metrics = metrics
        self.model = model
        self.arrived = arrived
        self.route = "pair"
        self._last_token_at: float | None = None

    def tokens(self, count: int, now: float) -> None:
        """`count` tokens reached the client at `now` (monotonic seconds)."""
        if count <= 0:
            return
        labels = (self.model, self.route)
        if self._last_token_at is None:
            self.metrics.ttft.labels(*labels).observe(now - self.arrived)
            count -= 1  # the first token has no gap before it; the rest of its message arrived with it
            gaps = [0.0] * count
        else:
            # Tokens that arrive together share the wait, so the gaps sum to the time between the last tokens.
            gaps = [(now - self._last_token_at) / count] * count
        for gap in gaps:
            self.metrics.inter_token.labels(*labels).observe(gap)
        self._last_token_at = now

    def finished(self, now: float) -> None:
        self.metrics.e2e.labels(self.model, self.route).observe(now - self.arrived)
        self.metrics.requests.labels(self.model, "ok").inc()
