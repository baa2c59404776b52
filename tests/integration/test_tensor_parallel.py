"""Tensor parallel 2 (engine/tensor_parallel/, engine/tp_ranks.py): the same tokens as TP 1 and as transformers.

Each engine here is rank 0 of two processes: it spawns rank 1 on 127.0.0.1, and both run every step over half of the
heads, KV heads, MLP columns and vocabulary, meeting in gloo all-reduces and all-gathers. The prompts and the pressure
(a pool small enough to preempt, a token budget that chunks prompts) are the HF parity test's. A model with a single
KV head has it replicated on both ranks. A rank killed with SIGKILL makes the engine fail its steps, bounded by the
collective timeout, never hang; closing the engine stops its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.state import ClusterView, LoadReport, NodeControl, connect, write_control
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import EngineError, ModelLoadError
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster, Process
from tests.conftest import ARCHS
from tests.hf_reference import assert_matches_reference, load_reference
from tests.integration import test_cluster_failures as failures
from tests.integration import test_kv_routing as kv_routing
from tests.integration import test_node_control as node_control
from tests.integration.cluster_client import generate_many, recent_requests
from tests.integration.test_hf_parity import MAX_TOKENS, PROMPT_LENGTHS, mixed_prompts

pytestmark = pytest.mark.timeout(600)


def engine(model_dir: Path, tensor_parallel: int, **overrides: object) -> LLMEngine:
    """The HF parity test's pressured engine (preemption and chunked prompts), at the given TP."""
    settings: dict[str, object] = dict(
        dtype="float32", block_size=16, num_kv_blocks=48, max_num_batched_tokens=64, max_num_seqs=8,
        tensor_parallel=tensor_parallel, tensor_parallel_timeout_s=20.0,
    )  # fmt: skip
    settings.update(overrides)
    return LLMEngine(model_dir, EngineConfig(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", [*ARCHS, "single-kv-head"])
def test_tp2_greedy_equals_tp1_and_transformers(
    arch: str, tiny_models: dict[str, Path], single_kv_head: Path, closing: list[LLMEngine]
) -> None:
    model_dir = single_kv_head if arch == "single-kv-head" else tiny_models[arch]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    tp1 = engine(model_dir, 1)
    prompts = mixed_prompts(tp1.tokenizer.vocab_size)
    expected = tp1.generate(prompts, params)
    tp2 = engine(model_dir, 2)
    closing.append(tp2)
    # Rank 0 holds half of the 4 heads and one KV head: half of 2, or the single one, replicated.
    assert (tp2.model.config.num_heads, tp2.model.config.num_kv_heads) == (2, 1)
    got = tp2.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for ours, theirs in zip(got, expected, strict=True):
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
    stats = tp2.stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    report = assert_matches_reference(load_reference(model_dir), got)
    assert report.tokens_compared == MAX_TOKENS * len(PROMPT_LENGTHS)


def test_tp2_prompt_logprobs_equal_tp1(llama_dir: Path, closing: list[LLMEngine]) -> None:
    """Prompt logprobs gather the vocabulary on every rank, a chunk of rows at a time, like the sampled rows."""
    prompt = mixed_prompts(500, seed=3)[5]  # 160 tokens: three chunks at a 64-token budget
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    want = engine(llama_dir, 1).generate([prompt], params)[0].prompt_logprobs
    tp2 = engine(llama_dir, 2)
    closing.append(tp2)
    got = tp2.generate([prompt], params)[0].prompt_logprobs
    assert want is not None and got is not None and len(got) == len(want)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_killed_rank_fails_the_engine_within_its_timeout_and_close_stops_the_rest(
    llama_dir: Path, closing: list[LLMEngine]
) -> None:
    tp2 = engine(llama_dir, 2, tensor_parallel_timeout_s=5.0)
    closing.append(tp2)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert tp2.generate([[5, 6, 7]], params)[0].token_ids  # both ranks run
    assert tp2.tp_group is not None
    worker = tp2.tp_group.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    started = time.monotonic()
    with pytest.raises(EngineError):
        tp2.generate([[5, 6, 7]], params)
    assert time.monotonic() - started < 30
    tp2.close()
    assert not worker.is_alive()


def test_tp_that_does_not_divide_the_model_is_refused(llama_dir: Path) -> None:
    for role in ("colocated", "prefill", "decode"):
        with pytest.raises(ModelLoadError, match="tensor parallel 3 does not divide"):
            engine(llama_dir, 3, role=role)


def child_pids(pid: int) -> list[int]:
    """The tensor-parallel ranks pid started, from /proc (multiprocessing's resource tracker is left out)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command and b"resource_tracker" not in command:
                found.append(int(child))
    return found


def test_colocated_tp2_nodes_serve_and_a_killed_rank_takes_only_its_node_down(llama_dir: Path) -> None:
    """Two colocated nodes at `--tensor-parallel 2` return a single engine's tokens. SIGKILL to one node's rank 1
    stops that node (its engine sees the rank gone even while idle, and the node leaves the cluster, exit 1, no
    process left behind), and requests keep completing on the other node."""
    prompts = mixed_prompts(500, seed=4)[:4]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [
        c.token_ids for c in LLMEngine(llama_dir, EngineConfig(num_kv_blocks=256)).generate(prompts, params)
    ]
    sampling = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    spec = ClusterSpec(model_dir=llama_dir, prefill=0, decode=0, colocated=2, grpc_port=0, http_port=0,
                       role_args={"colocated": ["--tensor-parallel", "2"]})  # fmt: skip
    with LocalCluster(spec) as cluster:
        assert [r.token_ids for r in generate_many(cluster.router_address, prompts, **sampling)] == want
        victim, survivor = cluster.by_role("colocated")
        ranks = child_pids(victim.popen.pid)
        assert len(ranks) == 1 and len(child_pids(survivor.popen.pid)) == 1  # one worker rank each
        os.kill(ranks[0], signal.SIGKILL)
        assert (
            victim.popen.wait(timeout=60) != 0
        )  # noticed while idle: the node stops, not waits for a request
        deadline = time.monotonic() + 30
        while Path(f"/proc/{ranks[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(
            3
        ):  # the router may still list it for a moment: a failed attempt there is retried elsewhere
            assert [r.token_ids for r in generate_many(cluster.router_address, prompts, **sampling)] == want


# Whole blocks (2-2) and head slices both ways on torch; head slices through NIXL. One KV head replicated on every
# rank (sent once per decode rank) is checked per head in tests/integration/test_tp_kv_transfer.py, in-process.
RANK_TO_RANK_CASES = [
    *[("llama", p, d, "torch") for p, d in ((2, 2), (2, 1), (1, 2))],
    *[("llama", p, d, "nixl") for p, d in ((2, 1), (1, 2))],
    ("single-kv-head", 2, 1, "torch"),
]


@pytest.mark.parametrize(("model", "prefill_tp", "decode_tp", "kv_backend"), RANK_TO_RANK_CASES)
def test_split_clusters_write_kv_rank_to_rank_and_return_a_single_engines_tokens(
    model: str, prefill_tp: int, decode_tp: int, kv_backend: str, llama_dir: Path, single_kv_head: Path
) -> None:
    """A prefill node at `--tensor-parallel` p and a decode node at d: each prefill rank writes the KV heads each
    decode rank holds straight into it, through a transport of its own (cluster/node/rank_kv.py): whole blocks at
    p == d, head slices otherwise; layer by layer and in one piece (`--one-piece-below 64`). The decode node admits
    a request once every route's kv-done is in. Tokens: a single TP 1 engine's; every transfer counted as rank to
    rank on the prefill node's /metrics."""
    if kv_backend == "nixl":
        pytest.importorskip("nixl")
    model_dir = single_kv_head if model == "single-kv-head" else llama_dir
    prompts = mixed_prompts(500, seed=8)[:6]  # both sides of --one-piece-below 64
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [
        c.token_ids for c in LLMEngine(model_dir, EngineConfig(num_kv_blocks=256)).generate(prompts, params)
    ]
    role_args = {
        "prefill": ["--tensor-parallel", str(prefill_tp), "--one-piece-below", "64"],
        "decode": ["--tensor-parallel", str(decode_tp)],
    }
    spec = ClusterSpec(model_dir=model_dir, prefill=1, decode=1, grpc_port=0, http_port=0, kv_backend=kv_backend,
                       role_args=role_args)  # fmt: skip
    with LocalCluster(spec) as cluster:
        sampling = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        assert [r.token_ids for r in generate_many(cluster.router_address, prompts, **sampling)] == want
        (prefill,) = cluster.by_role("prefill")
        assert len(child_pids(prefill.popen.pid)) == prefill_tp - 1  # its worker ranks
        counted = node_control.samples(prefill.metrics_address, "splitserve:kv_rank_to_rank_transfers_total")
        assert [value for _, value in counted] == [len(prompts)]


@dataclass
class KilledRank:
    cluster: LocalCluster
    victim: Process
    progress: list[int]  # tokens each stream had received at the kill
    load: LoadReport | None  # the victim's last load report before it


@contextlib.contextmanager
def rank_killed_mid_stream(
    model: Path,
    role: str,
    batch: list[list[int]],
    after_tokens: int,
    prefill: int,
    decode: int,
    every_node_tp2: bool = False,
) -> Iterator[KilledRank]:
    """A cluster whose `role` nodes (or all, every_node_tp2) run at `--tensor-parallel 2`; SIGKILL to rank 1 of the
    first `role` node once every stream has `after_tokens` tokens. Checks what holds for every such kill: all
    streams end with a single engine's tokens, the victim exits non-zero and leaves the registry. Yields the run
    for the caller's own checks."""
    expected = failures.expected_tokens(model, batch)
    tp2 = ["--tensor-parallel", "2"]
    spec = ClusterSpec(model_dir=model, prefill=prefill, decode=decode, grpc_port=0, http_port=0,
                       node_args=tp2 if every_node_tp2 else [], role_args={} if every_node_tp2 else {role: tp2})  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        victim = cluster.by_role(role)[0]
        (rank,) = child_pids(victim.popen.pid)
        results, _, progress, load = asyncio.run(
            failures.stream_all_and_kill(cluster, view, batch, victim, after_tokens, victim_pid=rank)
        )
        assert [r.token_ids for r in results if r] == expected
        assert victim.popen.wait(timeout=60) != 0
        assert view.wait_for(lambda: view.get(victim.node_id) is None, timeout_s=10.0)
        yield KilledRank(cluster, victim, progress, load)


def test_decode_tp2_nodes_return_a_single_engines_tokens_and_a_killed_rank_fails_no_request(
    llama_dir: Path,
) -> None:
    """TP 1 prefill into two `--tensor-parallel 2` decode nodes. SIGKILL to rank 1 of one decode node mid-stream:
    that node stops (exit status not 0, its rank gone), and every stream resumes on the other with the single
    engine's tokens, none repeated."""
    batch = failures.prompts(6, 40, seed=3)
    with rank_killed_mid_stream(llama_dir, "decode", batch, after_tokens=5, prefill=1, decode=2) as run:
        load = run.load
        held = load is not None and (load.running_requests > 0 or load.free_kv_blocks < load.total_kv_blocks)
        assert held, "the victim served no stream when its rank died"
        assert min(run.progress) < failures.MAX_TOKENS, (
            "every stream finished before the kill: the test proved nothing"
        )


def test_a_killed_decode_rank_between_rank_to_rank_nodes_fails_no_request(llama_dir: Path) -> None:
    """Every node at `--tensor-parallel 2` (KV rank to rank); SIGKILL to rank 1 of a decode node mid-stream: its
    streams resume on the other decode node, their KV (prompt and tokens so far) written rank to rank again, with
    a single engine's tokens."""
    batch = failures.prompts(4, 40, seed=4)
    with rank_killed_mid_stream(
        llama_dir, "decode", batch, after_tokens=5, prefill=1, decode=2, every_node_tp2=True
    ) as run:
        assert min(run.progress) < failures.MAX_TOKENS, "every stream finished before the kill"
        (prefill,) = run.cluster.by_role("prefill")
        (transfers,) = [
            value
            for _, value in node_control.samples(
                prefill.metrics_address, "splitserve:kv_rank_to_rank_transfers_total"
            )
        ]
        assert transfers > len(batch), (
            "no stream resumed rank to rank"
        )  # the first transfers, then the resumed


def test_tp2_nodes_reuse_a_conversations_prefix_both_ways(llama_dir: Path) -> None:
    """Prefill and decode nodes both at `--tensor-parallel 2`. Turn 2 of each conversation: the decode node shares
    the blocks turn 1 left in its ranks' pools and receives only the rest, and sends the prefill node the answer's
    blocks it lacks (gathered from its ranks first), which the prefill ranks take their heads of. Tokens: a single
    TP 1 engine's."""
    turn1, out1, turn2, out2 = kv_routing.two_turns(llama_dir, random.Random(5), 2)
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       node_args=["--tensor-parallel", "2"], router_args=["--policy", "kv"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        assert [
            r.token_ids for r in generate_many(cluster.router_address, turn1, **kv_routing.SAMPLING)
        ] == out1
        second = [
            generate_many(cluster.router_address, [prompt], **kv_routing.SAMPLING)[0] for prompt in turn2
        ]
        assert [r.token_ids for r in second] == out2
        assert all(r.usage and r.usage.cached_prompt_tokens >= kv_routing.BLOCK for r in second)
        records = recent_requests(cluster, 2)
        assert all(r["imported_bytes"] > 0 for r in records), records  # the answer's blocks came back


def test_cached_blocks_computed_rank_to_rank_are_gathered_for_a_peer_without_ranks(llama_dir: Path) -> None:
    """A `--tensor-parallel 2` prefill node sends turn 1 rank to rank, so its ranks' KV is not mirrored into rank
    0's whole-heads pool. Turn 2 goes to a decode node started with `--no-kv-rank-to-rank` (the first one gone)
    and reuses turn 1's blocks from the prefill node's prefix cache: they are gathered into the pool before they
    are sent, and the tokens are a single engine's (with the pool's stale blocks they would not be)."""
    turn1, out1, turn2, out2 = kv_routing.two_turns(llama_dir, random.Random(7), 2)
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       node_args=["--tensor-parallel", "2"])  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        assert [
            r.token_ids for r in generate_many(cluster.router_address, turn1, **kv_routing.SAMPLING)
        ] == out1
        (first,) = cluster.by_role("decode")
        cluster.start_node("decode", ["--tensor-parallel", "1", "--no-kv-rank-to-rank"], wait=True)
        first.popen.send_signal(signal.SIGTERM)
        assert first.popen.wait(timeout=60) == 0
        assert view.wait_for(lambda: view.get(first.node_id) is None, timeout_s=10.0)
        second = [
            generate_many(cluster.router_address, [prompt], **kv_routing.SAMPLING)[0] for prompt in turn2
        ]
        assert [r.token_ids for r in second] == out2
        assert all(r.usage and r.usage.cached_prompt_tokens >= kv_routing.BLOCK for r in second)
        (prefill,) = cluster.by_role("prefill")
        counted = node_control.samples(prefill.metrics_address, "splitserve:kv_rank_to_rank_transfers_total")
        assert [value for _, value in counted] == [len(turn1)]  # turn 2 went through the pool


def test_a_killed_prefill_rank_takes_its_node_down_and_its_prompts_retry_on_the_other(
    llama_dir: Path,
) -> None:
    """Two `--tensor-parallel 2` prefill nodes; SIGKILL to rank 1 of one while prompts are in flight: that node
    stops (exit status not 0) and leaves the registry, the prompts it held are retried on the other, and every
    request completes with a single engine's tokens."""
    batch = failures.prompts(8, 300, seed=2)
    with rank_killed_mid_stream(llama_dir, "prefill", batch, after_tokens=0, prefill=2, decode=1) as run:
        retried = [r for r in recent_requests(run.cluster, len(batch)) if r["retries"]]
        assert retried and all(
            run.victim.node_id in r["retries"][0] for r in retried
        )  # its prompts went elsewhere


def test_a_tp2_node_moves_from_the_prefill_pool_to_the_decode_pool_with_its_ranks(llama_dir: Path) -> None:
    """A `--tensor-parallel 2` prefill node told to move serves as a TP 2 decode node: its old rank stops with
    its engine, the re-executed node starts one rank again, and with the original decode node drained the batch is
    decoded there with a single engine's tokens."""
    batch = node_control.prompts(4, seed=29)
    expected = node_control.expected_tokens(llama_dir, batch)
    sampling = {"max_tokens": 32, "temperature": 0.0, "ignore_eos": True}
    spec = ClusterSpec(model_dir=llama_dir, prefill=2, decode=1, grpc_port=0, http_port=0,
                       node_args=["--tensor-parallel", "2"])  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        client = connect(cluster.redis_url)
        mover, (decode,) = cluster.by_role("prefill")[0], cluster.by_role("decode")
        (old_rank,) = child_pids(mover.popen.pid)
        lines = node_control.NodeLines(mover)
        write_control(client, mover.node_id, NodeControl(pool="decode"))
        assert lines.next_event("moving")["to"] == "decode"
        ready = lines.next_event("ready")
        assert ready["role"] == "decode" and mover.popen.poll() is None
        ranks = child_pids(mover.popen.pid)
        assert len(ranks) == 1 and ranks != [old_rank] and not Path(f"/proc/{old_rank}").exists()
        write_control(client, decode.node_id, NodeControl(drain=True))
        moved = str(ready["node_id"])

        def serving() -> bool:
            state, old = view.get(moved), view.get(decode.node_id)
            return state is not None and old is not None and old.load is not None and old.load.draining

        assert view.wait_for(serving, timeout_s=node_control.WAIT_S)
        with node_control.LoadLog(cluster.redis_url) as log:
            assert [r.token_ids for r in generate_many(cluster.router_address, batch, **sampling)] == expected
        assert log.busy_reports(moved) > 0 and log.busy_reports(decode.node_id) == 0
        client.close()
