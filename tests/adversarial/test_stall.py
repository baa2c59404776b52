"""A node that is alive but stuck leaves the cluster within seconds, its requests finish elsewhere, and it comes back.

SIGSTOP and kill -9 stop a node's lease (tests/adversarial/test_chaos.py). A wedged kernel does not: the process's
publisher thread would go on renewing the lease while the engine thread sits in one step. The engine's test hook
(`SPLITSERVE_TEST_FAIL_MARKER=stall:<token>:<seconds>`) makes one prefill node's forward sleep inside the step for
every prompt holding the marker token; the node's progress watch (cluster/node/progress_watch.py) must withdraw it, the router
must re-place its requests on the healthy prefill node with exact output, and the node must register again once its
step ends.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cluster.state import ClusterView
from engine.fault_injection import ENV_VAR
from ops.launcher import LocalCluster
from tests.adversarial.chaos_support import Stream, await_node, cluster_spec, long_prompts, reference, stream

pytestmark = pytest.mark.timeout(300)
MARKER = 1023  # the tiny model's last token id; long_prompts draws from 3..999
STALL_S = 12.0
MAX_TOKENS = 8
# The progress watch's default (2 s) + the router's grace for a node missing from its view (0.5 s) + slack for a
# loaded 2-core machine; the bound for "no request waits more than 5 s longer".
DELAY_BOUND_S = 5.0


def test_a_stuck_engine_withdraws_its_node_and_its_requests_finish_elsewhere(llama_dir: Path) -> None:
    batch = [[*prompt, MARKER] for prompt in long_prompts(6, seed=31, shortest=100, longest=200)]
    expected = reference(llama_dir, batch, MAX_TOKENS)
    cluster = LocalCluster(cluster_spec(llama_dir, prefill=1, decode=0))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(ENV_VAR, f"stall:{MARKER}:{STALL_S}")
            cluster.start()  # the first prefill node inherits the hook
        _serve_around_the_stuck_node(cluster, batch, expected)
    finally:
        cluster.stop()


def _serve_around_the_stuck_node(
    cluster: LocalCluster, batch: list[list[int]], expected: list[list[int]]
) -> None:
    with ClusterView(cluster.redis_url) as view:
        stuck = cluster.by_role("prefill")[0]
        # The healthy nodes start without the hook (the environment above was restored).
        healthy = [cluster.start_node(role) for role in ("prefill", "decode")]
        for proc in healthy:
            await_node(cluster, proc, view)
        withdrawn_at: list[float] = []

        async def run(prompts: list[list[int]]) -> list[Stream]:
            tasks = [asyncio.create_task(stream(cluster.router_address, p, MAX_TOKENS)) for p in prompts]
            while not all(t.done() for t in tasks):
                if not withdrawn_at and view.get(stuck.node_id) is None:
                    withdrawn_at.append(time.monotonic())
                await asyncio.sleep(0.01)
            return [t.result() for t in tasks]

        # The same prompts without the marker: how long the batch takes when nothing is stuck.
        baseline = asyncio.run(run([p[:-1] for p in batch]))
        assert not withdrawn_at and [r.error for r in baseline] == [None] * len(batch)
        started = time.monotonic()
        results = asyncio.run(run(batch))
        assert [r.error for r in results] == [None] * len(batch)
        assert [r.token_ids for r in results] == expected
        assert withdrawn_at, "the stuck node never left the cluster view: the run proved nothing"
        assert stuck.popen.poll() is None, "the stuck node must stay alive: it is stuck, not dead"
        # Some request went to the stuck node (JSQ spreads six over two prefill nodes) and waited for the watch;
        # none waited more than 5 s longer than it would have.
        bound = max(r.seconds for r in baseline) + DELAY_BOUND_S
        assert max(r.seconds for r in results) <= bound, [round(r.seconds, 2) for r in results]
        assert withdrawn_at[0] - started <= DELAY_BOUND_S
        # Its step ends after STALL_S: the node registers again and serves.
        assert view.wait_for(lambda: view.get(stuck.node_id) is not None, timeout_s=STALL_S + 10.0)
