"""How fast a router reads cluster state: `ClusterView.nodes()` lookups/s with 1,000 registered nodes.

Baseline, measured in the same run: asking Redis on every lookup (one HGETALL of the node index, no decoding),
which is what the in-memory view saves a router. Printed:
  - lookups/s of `nodes()` and `nodes("decode")` while nothing changes, and while every node reports its load
    `--load-hz` times a second (each report invalidates the cached tuples);
  - the time a new view takes to start (full sync: snapshot script + fetching every NodeInfo);
  - how long the last of a burst of 1,000 load events takes to show in the view.

    .venv/bin/python benchmarks/router_view.py [--nodes 1000] [--seconds 2] [--load-hz 10] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import redis

from cluster.redis_server import ensure_redis
from cluster.state import (
    EVENTS_CHANNEL,
    INDEX_KEY,
    ROLES,
    ClusterView,
    Event,
    LoadReport,
    NodeInfo,
    NodeRegistration,
    encode_event,
    encode_load,
    load_key,
)


def register_nodes(url: str, count: int) -> None:
    for i in range(count):
        node = NodeRegistration(url, ttl_s=600)  # long lease: the benchmark sends no heartbeats
        transport = bytes(512)  # a NIXL agent descriptor is a few hundred bytes to a few KB
        node.register(
            NodeInfo(
                f"node-{i}", ROLES[i % 3], f"10.0.{i // 250}.{i % 250}:50051", "m", "cpu", 4096, 16, transport
            )
        )
        node.close()


def report(i: int, free: int) -> LoadReport:
    return LoadReport(
        f"node-{i}", queued_prompt_tokens=0, running_requests=1, free_kv_blocks=free, total_kv_blocks=4096
    )


def publish_loads(client: redis.Redis, count: int, free: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        load = report(i, free)
        pipe.set(load_key(load.node_id), encode_load(load), px=600_000)
        pipe.publish(EVENTS_CHANNEL, encode_event(Event("load", load.node_id, load=load)))
    pipe.execute()


def rate(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        calls += 100
    return calls / elapsed


def churn(url: str, count: int, hz: float, stop: threading.Event, last: list[int]) -> None:
    """Publishes a load report for every node `hz` times a second; `last[0]` is the value of the latest round."""
    client = redis.Redis.from_url(url)
    while not stop.wait(1.0 / hz):
        publish_loads(client, count, (last[0] + 1) % 4096)
        last[0] = (last[0] + 1) % 4096
    client.close()


def shows_everywhere(view: ClusterView, free: int) -> bool:
    return all(s.load is not None and s.load.free_kv_blocks == free for s in view.nodes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--load-hz", type=float, default=10.0, help="load reports per node per second under churn"
    )
    parser.add_argument("--redis-url", default=None, help="an external Redis (default: an embedded one)")
    args = parser.parse_args()

    with ensure_redis(args.redis_url) as url:
        register_nodes(url, args.nodes)
        started = time.perf_counter()
        view = ClusterView(url)
        view.start(timeout_s=30)
        start_ms = (time.perf_counter() - started) * 1000
        assert len(view.nodes()) == args.nodes, f"view has {len(view.nodes())} of {args.nodes} nodes"
        client = redis.Redis.from_url(url)

        baseline = rate(lambda: client.hgetall(INDEX_KEY), args.seconds)
        quiet_all = rate(view.nodes, args.seconds)
        quiet_decode = rate(lambda: view.nodes("decode"), args.seconds)

        burst_start = time.perf_counter()
        publish_loads(client, args.nodes, free=4095)
        view.wait_for(lambda: shows_everywhere(view, 4095), 30)
        burst_ms = (time.perf_counter() - burst_start) * 1000

        stop, last = threading.Event(), [0]
        churner = threading.Thread(
            target=churn, args=(url, args.nodes, args.load_hz, stop, last), daemon=True
        )
        churner.start()
        busy_decode = rate(lambda: view.nodes("decode"), args.seconds)
        stop.set()
        churner.join(10)
        stopped = time.perf_counter()
        caught_up = view.wait_for(lambda: shows_everywhere(view, last[0]), 30)
        catch_up_ms = (time.perf_counter() - stopped) * 1000
        view.stop()
        client.close()

    print(f"nodes: {args.nodes}; view start (full sync): {start_ms:.0f} ms")
    print(f"Redis HGETALL per lookup (baseline): {baseline:12,.0f} /s")
    print(f"view.nodes() quiet:                  {quiet_all:12,.0f} /s  ({quiet_all / baseline:,.0f}x)")
    print(f"view.nodes('decode') quiet:          {quiet_decode:12,.0f} /s  ({quiet_decode / baseline:,.0f}x)")
    print(
        f"view.nodes('decode') under {args.load_hz:g} Hz x {args.nodes} load reports: "
        f"{busy_decode:,.0f} /s  ({busy_decode / baseline:,.1f}x)"
    )
    print(f"burst of {args.nodes} load events visible in the view after {burst_ms:.0f} ms")
    lag = f"{catch_up_ms:.0f} ms" if caught_up else "not within 30 s"
    print(f"view showed the last churn round {lag} after the churn stopped")


if __name__ == "__main__":
    main()
