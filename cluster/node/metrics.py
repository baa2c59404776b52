"""A node's Prometheus metrics, served as text at GET /metrics on the node's own HTTP port (`--metrics-port`).

Every metric carries {role, node, machine_type}, so one Prometheus job can scrape every node of a cluster:
- splitserve:queued_prompt_tokens, splitserve:running_requests, splitserve:waiting_requests,
  splitserve:kv_blocks_used, splitserve:kv_blocks_free (gauges) and splitserve:preemptions_total (counter): read
  from the engine's load snapshot when scraped; splitserve:prefix_cache_queried_blocks_total and
  splitserve:prefix_cache_hit_blocks_total (counters) give the prefix cache's hit rate. The snapshot is refreshed by the engine thread after every step, so
  a scrape never waits for the engine and the engine never does work for a scrape.
- splitserve:node_power_watts{source}: the node's power meter, read when scraped (NVML "measured" or "modeled").
- Prefill nodes: splitserve:kv_transfer_seconds, a histogram of each request's KV transfer from its first write
  issued to its last write done (layer-wise transfers start while the prompt is still being computed), and
  splitserve:kv_transfer_bytes_total, the bytes those completed transfers wrote into decode nodes (of them,
  splitserve:kv_rank_to_rank_transfers_total counts those each tensor-parallel rank wrote to its peer rank itself,
  cluster/node/rank_kv.py);
  splitserve:kv_imported_blocks_total and splitserve:kv_imported_bytes_total, the prefix blocks decode nodes wrote
  back into this node so it need not compute them (prefill_node/prefix_pull.py).
One registry per node (not prometheus_client's global one), so tests that run several nodes in one process never
share counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.power.telemetry import PowerMeter
from engine.async_engine import AsyncEngine

LABELS = ["role", "node", "machine_type"]
# A transfer of a short prompt between two processes on one host takes about a millisecond; a 70B model's
# multi-thousand-token KV over InfiniBand tens to hundreds of milliseconds (Splitwise, section V).
TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    role: str
    node_id: str
    machine_type: str

    @property
    def label_values(self) -> list[str]:
        return [self.role, self.node_id, self.machine_type]


class NodeMetrics:
    def __init__(self, identity: NodeIdentity, engine: AsyncEngine, meter: PowerMeter) -> None:
        self.identity = identity
        self.registry = CollectorRegistry()
        self.registry.register(_EngineLoadCollector(identity, engine))
        self.registry.register(_PowerCollector(identity, meter))
        self._transfer_seconds: Histogram | None = None
        self._transfer_bytes: Counter | None = None
        self._rank_to_rank: Counter | None = None
        self._imported: tuple[Counter, Counter] | None = None
        if identity.role == "prefill":  # only prefill nodes send KV
            self._transfer_seconds = Histogram(
                "splitserve:kv_transfer_seconds",
                "Per request KV transfer time to the decode node, first write issued to last write done (s)",
                LABELS,
                registry=self.registry,
                buckets=TRANSFER_BUCKETS_S,
            ).labels(*identity.label_values)
            self._transfer_bytes = Counter(
                "splitserve:kv_transfer_bytes",
                "Bytes of KV written into decode nodes by completed transfers",
                LABELS,
                registry=self.registry,
            ).labels(*identity.label_values)
            self._rank_to_rank = Counter(
                "splitserve:kv_rank_to_rank_transfers",
                "Completed transfers each tensor-parallel rank wrote to the decode rank holding its KV heads",
                LABELS,
                registry=self.registry,
            ).labels(*identity.label_values)
            self._imported = tuple(  # type: ignore[assignment]
                Counter(name, text, LABELS, registry=self.registry).labels(*identity.label_values)
                for name, text in (
                    (
                        "splitserve:kv_imported_blocks",
                        "Prefix KV blocks decode nodes wrote back, not computed here",
                    ),
                    ("splitserve:kv_imported_bytes", "Bytes of those blocks"),
                )
            )

    def observe_kv_import(self, num_blocks: int, num_bytes: int) -> None:
        """Prefix blocks a decode node wrote back into this node (the prefill service calls it)."""
        if self._imported is None:
            raise RuntimeError(f"a {self.identity.role} node imports no KV")
        self._imported[0].inc(num_blocks)
        self._imported[1].inc(num_bytes)

    def observe_kv_transfer(self, seconds: float, num_bytes: int, rank_to_rank: bool = False) -> None:
        """One request's KV reached its decode node (the prefill service calls it)."""
        if self._transfer_seconds is None or self._transfer_bytes is None or self._rank_to_rank is None:
            raise RuntimeError(f"a {self.identity.role} node sends no KV")
        self._transfer_seconds.observe(seconds)
        self._transfer_bytes.inc(num_bytes)
        if rank_to_rank:
            self._rank_to_rank.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """GET /metrics over HTTP, on the node's asyncio loop (a scrape is a few microseconds of Python)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port) and return the port it took."""
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        taken: int = self._runner.addresses[0][1]
        return taken

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


class _EngineLoadCollector:
    """Reads the engine's load snapshot and preemption count at scrape time."""

    def __init__(self, identity: NodeIdentity, engine: AsyncEngine) -> None:
        self.identity = identity
        self.engine = engine

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are created per scrape; nothing to check names against up front

    def collect(self) -> Iterator[Metric]:
        load, labels = self.engine.load, self.identity.label_values
        gauges = {
            "splitserve:queued_prompt_tokens": (
                "Prompt (or recompute) tokens scheduled but not yet computed",
                load.queued_prompt_tokens,
            ),
            "splitserve:running_requests": ("Requests in the running batch", load.running_requests),
            "splitserve:waiting_requests": ("Requests waiting to be scheduled", load.waiting_requests),
            "splitserve:kv_blocks_used": (
                "KV cache blocks in use (running, held or cached)",
                load.total_kv_blocks - load.free_kv_blocks,
            ),
            "splitserve:kv_blocks_free": ("KV cache blocks free to allocate", load.free_kv_blocks),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(labels, value)
            yield family
        preemptions = CounterMetricFamily(
            "splitserve:preemptions", "Requests preempted to free KV blocks (recomputed later)", labels=LABELS
        )
        # stats() reads plain counters and list lengths: safe from this thread, and it takes no engine step.
        preemptions.add_metric(labels, self.engine.engine.stats().num_preemptions)
        yield preemptions
        for name, doc, value in (
            ("splitserve:prefix_cache_queried_blocks", "Full prompt blocks looked up in the prefix cache",
             load.prefix_queried_blocks),
            ("splitserve:prefix_cache_hit_blocks", "Of those, blocks the prefix cache held (not recomputed or "
             "received again)", load.prefix_hit_blocks),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(labels, value)
            yield counter


class _PowerCollector:
    def __init__(self, identity: NodeIdentity, meter: PowerMeter) -> None:
        self.identity = identity
        self.meter = meter

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        reading = self.meter.read()
        family = GaugeMetricFamily(
            "splitserve:node_power_watts",
            "This node's power (W), measured (NVML) or modeled from its utilisation",
            labels=[*LABELS, "source"],
        )
        family.add_metric([*self.identity.label_values, reading.source], reading.watts)
        yield family
