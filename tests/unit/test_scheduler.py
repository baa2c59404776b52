"""Scheduler: token budget, chunked prefill, preemption order, sequence limits."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make(n_prompt: int, name: str) -> Sequence:
    return Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(), detokenizer=None)


def advance(out) -> None:
    """What the engine does after a step: mark tokens computed, and give completing sequences a new token."""
    for chunk in out.chunks:
        done = chunk.completes_sequence
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if done:
            chunk.seq.output_token_ids.append(5)


def test_long_prompt_is_chunked_under_the_budget() -> None:
    sched = Scheduler(
        BlockManager(64, 4, enable_prefix_caching=False), max_num_batched_tokens=8, max_num_seqs=4
    )
    s = make(20, "a")
    sched.add(s)
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        sizes.append([c.num_tokens for c in out.chunks])
        assert out.num_tokens <= 8
        advance(out)
    assert sizes == [[8], [8], [4]]
    assert s.output_token_ids == [5]


def test_decodes_come_first_and_new_requests_fill_the_rest() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=10, max_num_seqs=4)
    a = make(3, "a")
    sched.add(a)
    advance(sched.schedule())
    b = make(30, "b")
    sched.add(b)
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=100, max_num_seqs=2)
    for i in range(3):
        sched.add(make(2, f"r{i}"))
    out = sched.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_pool_exhaustion_preempts_the_newest_and_requeues_it_first() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=4)
    old, new = make(4, "old"), make(3, "new")
    sched.add(old)
    sched.add(new)
    advance(sched.schedule())  # old: 2 blocks, new: 2 blocks; pool full
    assert bm.num_free_blocks == 0
    # old now needs position 4 -> a third block: new is preempted.
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["new"]
    assert [c.seq.request_id for c in out.chunks] == ["old"]
    assert new.status == SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_ids == []
    assert sched.waiting[0] is new


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_newest() -> None:
    bm = BlockManager(2, 2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=4)
    s = make(4, "solo")
    sched.add(s)
    advance(sched.schedule())
    out = sched.schedule()
    assert out.preempted == [s] and out.chunks == []
    assert bm.num_free_blocks == 2
