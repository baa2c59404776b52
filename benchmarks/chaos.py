"""Faults under load, at scale: N rounds of each fault on a live local cluster, with figures per fault.

The cluster (2 prefill + 2 decode nodes of a tiny random model, embedded Redis) runs under the same supervisor as
`splitserve up` (ops/supervisor.py), which starts again whatever died. Each round sends `--concurrency` long-prompt
greedy requests and injects one fault while the victim holds some of them:

    kill-decode     kill -9 of a decode node           kill-prefill    kill -9 of a prefill node
    stop-decode     SIGSTOP of a decode node (SIGCONT after the round)
    stop-prefill    SIGSTOP of a prefill node (likewise)
    cancel          every request cancelled while KV is in transfer (its blocks must be free within 5 s)
    kill-redis      kill -9 of the embedded Redis

Printed per fault: requests sent / failed / resumed (the router abandoned an attempt and went on elsewhere), wrong
outputs (against the single-process engine), detection time (fault -> the victim leaves the routers' view; for
cancels, fault -> every KV block free again) and recovery time (fault -> the last request in flight at the fault
ended; for kills, also until the restarted part is back: "back"). Then a fuzz run of `--fuzz` inputs per endpoint
(benchmarks/fuzz_endpoints.py) against the same cluster, with its 5xx and hang counts.

    python benchmarks/chaos.py [--rounds 20] [--concurrency 16] [--faults kill-decode,stop-prefill] [--fuzz 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.state import ClusterStateUnavailable, ClusterView  # noqa: E402
from engine.tiny_model import make_tiny_model  # noqa: E402
from ops.launcher import ClusterSpec, LocalCluster, Process  # noqa: E402
from ops.supervisor import Supervisor  # noqa: E402
from tests.adversarial.chaos_support import (  # noqa: E402
    Stream,
    holds_work,
    kv_all_free,
    long_prompts,
    reference,
    stream,
    wait_until,
)

FAULTS = ("kill-decode", "kill-prefill", "stop-decode", "stop-prefill", "cancel", "kill-redis")
MAX_TOKENS = 32


@dataclass
class FaultFigures:
    sent: int = 0
    failed: int = 0
    wrong: int = 0
    resumed: int = 0
    detection_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    back_s: list[float] = field(default_factory=list)  # a killed part restarted and usable again
    errors: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, cluster: LocalCluster, view: ClusterView, model: Path, concurrency: int) -> None:
        self.cluster, self.view, self.model, self.concurrency = cluster, view, model, concurrency
        self._seed = 0

    def round(self, fault: str, figures: FaultFigures) -> None:
        self._seed += 1
        batch = long_prompts(self.concurrency, seed=1000 + self._seed)
        expected = reference(self.model, batch, MAX_TOKENS)
        labels = [f"chaos-{fault}-{self._seed}-{i}" for i in range(len(batch))]
        results, cancelled = asyncio.run(self._run(fault, batch, labels, figures))
        for i, (result, want) in enumerate(zip(results, expected, strict=True)):
            figures.sent += 1
            if i in cancelled:  # cancelled by the client on purpose: neither failed nor checked
                continue
            if result.error:
                figures.failed += 1
                figures.errors.append(result.error)
            elif result.token_ids != want:
                figures.wrong += 1
            figures.resumed += bool(self._retries(labels[i]))

    async def _run(
        self, fault: str, batch: list[list[int]], labels: list[str], figures: FaultFigures
    ) -> tuple[list[Stream], set[int]]:
        address = self.cluster.router_address
        tasks = [
            asyncio.create_task(stream(address, p, MAX_TOKENS, request_id=label))
            for p, label in zip(batch, labels, strict=True)
        ]
        cancelled: set[int] = set()
        if fault == "cancel":
            decode_ids = [p.node_id for p in self._live("decode")]
            await wait_until(lambda: any(holds_work(self.view, n) for n in decode_ids), 30, 0.001)
            cancelled = {i for i, task in enumerate(tasks) if not task.done()}
            for i in cancelled:
                tasks[i].cancel()
            at = time.monotonic()
            await asyncio.gather(*tasks, return_exceptions=True)
            if await self._settled(lambda: all(kv_all_free(self.view, n) for n in decode_ids), 60):
                figures.detection_s.append(time.monotonic() - at)
                figures.recovery_s.append(time.monotonic() - at)
            else:
                figures.errors.append("KV blocks of cancelled requests still held 60 s after the cancel")
            return [Stream() if i in cancelled else tasks[i].result() for i in range(len(tasks))], cancelled
        at, victim = await self._inject(fault, tasks)
        try:
            if victim is not None:
                gone = await self._settled(lambda: self.view.get(victim.node_id) is None, 30)
                if gone:
                    figures.detection_s.append(time.monotonic() - at)
            results = list(await asyncio.gather(*tasks))
            figures.recovery_s.append(time.monotonic() - at)
        finally:
            if fault.startswith("stop") and victim is not None:
                os.kill(victim.popen.pid, signal.SIGCONT)
        if fault.startswith("kill"):
            await self._back(fault, victim, at, figures)
        return results, cancelled

    async def _inject(self, fault: str, tasks: list[asyncio.Task[Stream]]) -> tuple[float, Process | None]:
        if fault == "kill-redis":
            await asyncio.sleep(0.3)
            redis = self.cluster.redis
            assert redis is not None and redis.pid is not None
            os.kill(redis.pid, signal.SIGKILL)
            return time.monotonic(), None
        role = fault.split("-")[1]
        candidates = self._live(role)
        await wait_until(lambda: any(holds_work(self.view, p.node_id) for p in candidates), 30, 0.001)
        victim = next((p for p in candidates if holds_work(self.view, p.node_id)), candidates[0])
        os.kill(victim.popen.pid, signal.SIGKILL if fault.startswith("kill") else signal.SIGSTOP)
        return time.monotonic(), victim

    async def _back(self, fault: str, victim: Process | None, at: float, figures: FaultFigures) -> None:
        """Wait for the supervisor to bring the killed part back, and for it to be usable."""
        if victim is None:  # Redis: back when a fresh view of the restarted Redis lists every node again
            want = {p.node_id for p in self.cluster.processes if p.role != "router"}
            ok = await self._settled(lambda: want <= _fresh_node_ids(self.cluster.redis_url), 60)
        else:
            old_id = victim.node_id

            def rejoined() -> bool:
                self.cluster.poll_events()  # picks up the restarted process's ready line
                return victim.node_id != old_id and self.view.get(victim.node_id) is not None

            ok = await self._settled(rejoined, 60)
        if ok:
            figures.back_s.append(time.monotonic() - at)

    async def _settled(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        return await wait_until(predicate, timeout_s, 0.01)

    def _live(self, role: str) -> list[Process]:
        return [p for p in self.cluster.by_role(role) if p.popen.poll() is None and self.view.get(p.node_id)]

    def _retries(self, label: str) -> list[str]:
        url = f"http://{self.cluster.http_address}/dashboard/api/requests/{label}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return list(json.load(response).get("retries", []))
        except OSError:
            return []

    def warm_up(self) -> None:
        """One small fault-free batch: every (prefill, decode) pair connects its KV path before the first fault."""
        batch = long_prompts(4 * self.concurrency, seed=1, shortest=50, longest=100)
        asyncio.run(_all(self.cluster.router_address, batch))

    def wait_until_whole(self, timeout_s: float = 60.0) -> None:
        """Between rounds: every paused node resumed and registered again, two nodes per pool."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.cluster.poll_events()
            if len(self._live("prefill")) >= 2 and len(self._live("decode")) >= 2:
                return
            time.sleep(0.1)
        raise TimeoutError("the cluster did not get back to 2 prefill + 2 decode nodes")


def _fresh_node_ids(redis_url: str) -> set[str]:
    """The nodes registered in Redis now (empty while it is down); the routers' views keep their last state."""
    view = ClusterView(redis_url, timeout_s=0.5)
    try:
        view.start(timeout_s=0.5)
    except ClusterStateUnavailable:
        return set()
    try:
        return {s.info.node_id for s in view.nodes()}
    finally:
        view.stop()


async def _all(address: str, batch: list[list[int]]) -> list[Stream]:
    return list(await asyncio.gather(*(stream(address, p, 4) for p in batch)))


def _supervise(cluster: LocalCluster, stop: threading.Event) -> None:
    supervisor = Supervisor(cluster, say=lambda line: print(f"  [{line}]", flush=True))
    while not stop.wait(0.25):
        supervisor.tick()


def _print_figures(results: dict[str, FaultFigures]) -> None:
    def median(values: list[float]) -> str:
        return f"{statistics.median(values):6.2f}" if values else "     -"

    def worst(values: list[float]) -> str:
        return f"{max(values):6.2f}" if values else "     -"

    print(
        f"\n{'fault':<13} {'sent':>5} {'failed':>6} {'wrong':>5} {'resumed':>7} "
        f"{'detect med/max s':>17} {'recover med/max s':>18} {'back med/max s':>15}"
    )
    for fault, f in results.items():
        print(
            f"{fault:<13} {f.sent:>5} {f.failed:>6} {f.wrong:>5} {f.resumed:>7} "
            f"{median(f.detection_s)}/{worst(f.detection_s)}    {median(f.recovery_s)}/{worst(f.recovery_s)}"
            f"     {median(f.back_s)}/{worst(f.back_s)}"
        )
        for error in f.errors[:3]:
            print(f"    failure: {error[:200]}")


def _fuzz(cluster: LocalCluster, count: int, seed: int) -> None:
    try:
        from benchmarks.fuzz_endpoints import run_fuzz
    except ImportError as exc:
        print(f"\nfuzz: skipped (benchmarks/fuzz_endpoints.run_fuzz is not available: {exc})")
        return
    result = run_fuzz(cluster.http_address, cluster.router_address, count, seed)
    findings, seconds = result.pop("findings", []), result.pop("seconds", 0.0)
    print(f"\nfuzz: {count} inputs per endpoint family in {seconds} s")
    for endpoint, counts in result.items():
        print(f"  {endpoint:<28} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    for finding in findings[:5]:
        print(f"  finding: {str(finding)[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each fault")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per round")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzz inputs per endpoint family (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "chaos-model", layers=2, hidden=64, heads=4, kv_heads=2)
        spec = ClusterSpec(model_dir=model, prefill=2, decode=2, grpc_port=0, http_port=0, kv_backend="torch")
        stop = threading.Event()
        with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
            supervisor = threading.Thread(target=_supervise, args=(cluster, stop), daemon=True)
            supervisor.start()
            try:
                bench = Bench(cluster, view, model, args.concurrency)
                bench.warm_up()
                results: dict[str, FaultFigures] = {}
                for fault in faults:
                    figures = results.setdefault(fault, FaultFigures())
                    for r in range(args.rounds):
                        bench.wait_until_whole()
                        bench.round(fault, figures)
                        print(f"{fault} round {r + 1}/{args.rounds}: failed {figures.failed}", flush=True)
                _print_figures(results)
                if args.fuzz > 0:
                    bench.wait_until_whole()
                    _fuzz(cluster, args.fuzz, args.seed)
            finally:
                stop.set()
                supervisor.join(5)
                for proc in cluster.processes:  # a paused process cannot take SIGTERM: resume it first
                    if proc.popen.poll() is None:
                        os.kill(proc.popen.pid, signal.SIGCONT)


if __name__ == "__main__":
    main()
