"""KV between engines of different tensor-parallel degrees (engine/tensor_parallel/kv_resharding.py).

A prefill engine at TP p hands its prompt's KV to a decode engine at TP d through their transfer pools, the pools a
transport registers (every KV head, the layout of a TP 1 engine), as InProcessTransfer plays the transport. The
tokens must be a single TP 1 engine's, and every decode rank's own blocks must hold, head by head, exactly what
the prefill ranks computed: the heads a rank owns on one side land on whichever rank owns them on the other,
replicated heads on every rank that holds them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from cluster.node.rank_kv import RankedKV, RankKV, RankWrite, rank_extension, start_rank_kv
from engine import prefix_import
from engine.config import EngineConfig, EngineRole, RankExtension
from engine.engine import LLMEngine
from engine.outputs import KVHandoff, KVLayerWrite, KVStepPlan
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from engine.tensor_parallel import TPPlan
from kvtransfer import create_transport
from kvtransfer.base import TransferState
from kvtransfer.descriptor import NodeDescriptor
from kvtransfer.notifications import kv_done
from tests.integration.test_engine_roles import InProcessTransfer, prompts, run_pair

pytestmark = pytest.mark.timeout(600)

BLOCK = 16


def engine(
    model_dir: Path,
    role: EngineRole,
    tp: int,
    closing: list[LLMEngine],
    extension: RankExtension | None = None,
) -> LLMEngine:
    config = EngineConfig(
        role=role, dtype="float32", block_size=BLOCK, num_kv_blocks=96, max_num_batched_tokens=48,
        max_num_seqs=8, tensor_parallel=tp, tensor_parallel_timeout_s=20.0, rank_extension=extension,
    )  # fmt: skip
    made = LLMEngine(model_dir, config)
    closing.append(made)
    return made


CASES = [("llama", 2, 1), ("llama", 1, 2), ("single-kv-head", 2, 1), ("single-kv-head", 1, 2)]


@pytest.mark.parametrize(("model", "prefill_tp", "decode_tp"), CASES)
def test_split_across_tp_degrees_returns_a_tp1_engines_tokens_and_every_rank_holds_its_heads(
    model: str,
    prefill_tp: int,
    decode_tp: int,
    tiny_models: dict[str, Path],
    single_kv_head: Path,
    closing: list[LLMEngine],
) -> None:
    model_dir = single_kv_head if model == "single-kv-head" else tiny_models[model]
    prefill = engine(model_dir, EngineRole.PREFILL, prefill_tp, closing)
    decode = engine(model_dir, EngineRole.DECODE, decode_tp, closing)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    # One prompt first, checked head by head while both sides still hold its blocks.
    prompt = prompts(prefill.tokenizer.vocab_size)[3]  # 95 tokens: five full blocks and a partial one
    transfer = InProcessTransfer(prefill, decode)
    transfer.dst_blocks["one"] = dst = decode.reserve("one", prompt, params)
    done = _prefill_one(prefill, "one", prompt, params)
    computed = prefill.kv_blocks_by_rank(done.block_ids)
    decode.admit("one", done.first_token_id, done.first_logprob)
    prefill.release("one")
    decode.step()  # the decode ranks take their heads of the received blocks before this step's forward
    _assert_every_rank_holds_its_heads(prefill, computed, decode, decode.kv_blocks_by_rank(dst), len(prompt))
    while decode.has_unfinished():
        decode.step()

    # Then a batch with shared prefixes (prefix-cache hits sent at hand-over), against a TP 1 colocated engine.
    batch = prompts(prefill.tokenizer.vocab_size, seed=11)
    want_tokens = {
        f"r{i}": c.token_ids
        for i, c in enumerate(engine(model_dir, EngineRole.COLOCATED, 1, closing).generate(batch, params))
    }
    tokens, _ = run_pair(prefill, decode, batch, params)
    assert tokens == want_tokens


def _prefill_one(prefill: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> KVHandoff:
    """Compute one prompt on a prefill engine; its hand-over (the blocks stay held until release)."""
    prefill.add_request(rid, prompt, params)
    for _ in range(100):
        done = next((o for o in prefill.step() if o.finish_reason == FinishReason.PREFILL_DONE), None)
        if done is not None:
            assert done.kv is not None
            return done.kv
    raise AssertionError(f"{rid} was not prefilled")


def _assert_every_rank_holds_its_heads(
    prefill: LLMEngine,
    computed: list[torch.Tensor],
    decode: LLMEngine,
    received: list[torch.Tensor],
    num_tokens: int,
) -> None:
    """Head by head: the prefill ranks holding a KV head agree on it, and every decode rank holding it has it."""
    assert len(computed) == prefill.config.tensor_parallel and len(received) == decode.config.tensor_parallel
    for head in range(prefill.model_config.num_kv_heads):
        want = [
            _head_rows(part, head, len(computed), r, prefill, num_tokens) for r, part in enumerate(computed)
        ]
        want = [w for w in want if w is not None]
        assert want and all(torch.equal(w, want[0]) for w in want)  # replicas agree on the prefill side
        got = [
            _head_rows(part, head, len(received), r, decode, num_tokens) for r, part in enumerate(received)
        ]
        got = [g for g in got if g is not None]
        assert got, f"no decode rank holds KV head {head}"
        for rows in got:
            assert torch.equal(rows, want[0]), f"KV head {head} differs on a decode rank"


def _head_rows(
    part: torch.Tensor, head: int, world: int, rank: int, engine: LLMEngine, num_tokens: int
) -> torch.Tensor | None:
    """One rank's K and V of whole KV head `head` at the prompt's token positions, or None if it does not hold it."""
    heads = TPPlan(engine.model_config, rank, world).kv_heads if world > 1 else range(part.shape[-2])
    if head not in heads:
        return None
    layers, n, two, bs, _, d = part.shape
    rows = part[..., head - heads.start, :].permute(0, 2, 1, 3, 4).reshape(layers, two, n * bs, d)
    return rows[:, :, :num_tokens]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2)])
def test_a_pulled_prefix_goes_from_the_decode_ranks_to_the_prefill_ranks_head_by_head(
    prefill_tp: int, decode_tp: int, llama_dir: Path, closing: list[LLMEngine]
) -> None:
    """Turn 1's answer was computed by the decode ranks only. Pulling it for turn 2 (prefill_node/prefix_pull.py,
    with this test as the transport): the decode node gathers its ranks' blocks into its transfer pool, and the
    prefill ranks take their heads of what lands in theirs; the tokens are a single TP 1 engine's."""
    prefill = engine(llama_dir, EngineRole.PREFILL, prefill_tp, closing)
    decode = engine(llama_dir, EngineRole.DECODE, decode_tp, closing)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = engine(llama_dir, EngineRole.COLOCATED, 1, closing)
    turn1 = prompts(prefill.tokenizer.vocab_size)[2]  # 40 tokens: turn 1's answer fills most of a third block
    out1 = reference.generate([turn1], params)[0].token_ids
    turn2 = [*turn1, *out1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    out2 = reference.generate([turn2], params)[0].token_ids
    transfer = InProcessTransfer(prefill, decode)
    assert _run(prefill, decode, transfer, "t1", turn1, params) == out1

    transfer.dst_blocks["t2"] = decode.reserve("t2", turn2, params)
    held = decode.cached_blocks("t2")
    assert held == (len(turn1) + len(out1) - 1) // BLOCK  # turn 1's prompt and answer, full blocks
    started = prefix_import.begin(prefill, "t2", turn2, held)
    assert started.first_block == len(turn1) // BLOCK and started.block_ids  # the answer's blocks are missing
    lent = prefix_import.pin(decode, "t2", started.first_block, len(started.block_ids))
    for layer in range(len(decode.kv_layers)):  # the transport's part: transfer pool to transfer pool
        prefill.kv_layers[layer][started.block_ids] = decode.kv_layers[layer][lent]
    prefix_import.finish(prefill, "t2", filled=True)
    prefix_import.unpin(decode, lent)
    lent_by_rank = decode.kv_blocks_by_rank(lent)
    prefill.add_request("t2", turn2, params)
    for out in prefill.step():  # the prefill ranks take their heads of the pulled blocks before this forward
        if out.finish_reason == FinishReason.PREFILL_DONE:
            transfer.hand_over(out)
    pulled = prefill.kv_blocks_by_rank(started.block_ids)
    rows = len(started.block_ids) * BLOCK
    for head in range(prefill.model_config.num_kv_heads):
        sent = [_head_rows(p, head, decode_tp, r, decode, rows) for r, p in enumerate(lent_by_rank)]
        came = [_head_rows(p, head, prefill_tp, r, prefill, rows) for r, p in enumerate(pulled)]
        sent_rows = next(x for x in sent if x is not None)
        assert all(torch.equal(x, sent_rows) for x in came if x is not None), f"KV head {head} differs"
    assert _finish(prefill, decode, transfer, "t2") == out2


def _run(
    prefill: LLMEngine, decode: LLMEngine, transfer: InProcessTransfer, rid: str, prompt: list[int], params
) -> list[int]:
    transfer.dst_blocks[rid] = decode.reserve(rid, prompt, params)
    prefill.add_request(rid, prompt, params)
    return _finish(prefill, decode, transfer, rid)


def _finish(prefill: LLMEngine, decode: LLMEngine, transfer: InProcessTransfer, rid: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(1000):
        for out in prefill.step():
            if out.finish_reason == FinishReason.PREFILL_DONE:
                transfer.hand_over(out)
        for out in decode.step():
            tokens.extend(out.new_token_ids)
            if out.finished:
                return tokens
    raise AssertionError(f"{rid} did not finish")


@pytest.mark.parametrize("role", [EngineRole.PREFILL, EngineRole.DECODE])
def test_rank_zeros_transfer_pool_counts_against_the_kv_memory_budget(
    role: EngineRole, llama_dir: Path, closing: list[LLMEngine]
) -> None:
    """`--kv-cache-mb` bounds rank 0's KV memory, transfer pool included: fewer blocks than at TP 1, not more bytes."""
    budget = 1 << 20
    split = LLMEngine(llama_dir, EngineConfig(role=role, tensor_parallel=2, kv_cache_memory_bytes=budget))
    closing.append(split)
    whole = LLMEngine(llama_dir, EngineConfig(role=role, kv_cache_memory_bytes=budget))
    used = sum(t.numel() * t.element_size() for t in [*split.runner.kv_caches, *split.kv_layers])
    per_block = used // split.runner.num_blocks
    assert budget - per_block < used <= budget  # as many blocks as fit, counting both pools
    assert split.runner.num_blocks < whole.runner.num_blocks  # the price of the transfer pool


def test_a_prefill_step_mirrors_into_the_transfer_pool_only_what_may_leave_through_it(
    llama_dir: Path, closing: list[LLMEngine]
) -> None:
    """A prefill node's plan exempts the requests whose KV goes rank to rank (cluster/node/rank_kv.py): their rows
    are not gathered into rank 0's whole-heads pool, the others' are; export_blocks gathers exempted blocks later
    (a peer without ranks may be sent them from the prefix cache)."""
    prefill = engine(llama_dir, EngineRole.PREFILL, 2, closing)
    prefill.set_kv_layer_hook(
        lambda _layer, _writes: None, lambda _w: KVStepPlan(unmirrored=frozenset({"b"}))
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    batch = prompts(prefill.tokenizer.vocab_size)
    for rid, prompt in (("a", batch[3]), ("b", batch[4])):
        prefill.add_request(rid, prompt, params)
    blocks: dict[str, list[int]] = {}
    for _ in range(100):
        blocks |= {o.request_id: o.kv.block_ids for o in prefill.step() if o.kv is not None}
        if len(blocks) == 2:
            break
    assert set(blocks) == {"a", "b"}

    def pool_and_ranks(rid: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(blocks[rid])
        pool = torch.stack([layer.index_select(0, index) for layer in prefill.kv_layers])
        return pool, torch.cat(prefill.kv_blocks_by_rank(blocks[rid]), dim=-2)  # rank r holds KV head r

    pool, ranks = pool_and_ranks("a")
    assert ranks.any() and torch.equal(pool, ranks)  # mirrored as it was computed
    pool, ranks = pool_and_ranks("b")
    assert ranks.any() and not pool.any()  # exempt: the pool never saw it
    prefill.export_blocks(blocks["b"])
    pool, ranks = pool_and_ranks("b")
    assert torch.equal(pool, ranks)


class RankToRank:
    """Plays the prefill node's service over real rank transports (cluster/node/rank_kv.py): each step's layer plan
    goes to every prefill rank, whose own transport writes the heads each decode rank holds into it."""

    def __init__(self, prefill: LLMEngine, decode: LLMEngine, closing: list[object]) -> None:
        self.prefill, self.decode = prefill, decode
        self.ranks = [ranked_kv(prefill, "p", closing), ranked_kv(decode, "d", closing)]
        self.key = self.ranks[0].connect(published(decode, self.ranks[1]))
        self.dst_blocks: dict[str, list[int]] = {}
        self._plan: list[RankWrite] = []
        prefill.set_kv_layer_hook(lambda layer, _writes: self.ranks[0].local.on_layer_stored(layer, self._plan),
                                  self.plan)  # fmt: skip

    def plan(self, writes: list[KVLayerWrite]) -> KVStepPlan:
        self._plan = []
        for w in writes:
            first = w.start // BLOCK
            dst = self.dst_blocks[w.request_id][first : first + len(w.block_ids)]
            self._plan.append(RankWrite(self.key, w.request_id, w.block_ids, dst))
        return KVStepPlan(self._plan, frozenset(w.request_id for w in writes))

    def hand_over(self, rid: str, kv: KVHandoff) -> None:
        """Every rank's writes done: each rank's kv-done; the decode node admits once every route's is in."""
        sender, receiver = self.ranks
        assert _settled(sender, rid)
        tail = len(self.dst_blocks[rid]) - 1
        last = len(self.prefill.kv_layers) - 1
        sender.write(self.key, rid, [last], kv.block_ids[tail:], self.dst_blocks[rid][tail:], kv_done(rid))
        assert _settled(sender, rid)
        deadline = time.monotonic() + 20
        while ("p", kv_done(rid)) not in receiver.notifications():
            assert time.monotonic() < deadline, f"no kv-done of {rid} from every route"
            time.sleep(0.01)
        self.decode.admit(rid, kv.first_token_id, kv.first_logprob, kv_in_ranks=True)


def ranked_kv(made: LLMEngine, node_id: str, closing: list[object]) -> RankedKV:
    world = made.config.tensor_parallel
    options = {"host": "127.0.0.1", "transfer_timeout_s": 20.0}
    if world == 1:
        transport = create_transport("torch", node_id, **options)
        transport.register(made.kv_layers)
        local = RankKV(0, transport)
    else:
        local = start_rank_kv(0, made.runner.kv_caches, backend="torch", node_id=node_id, world=world,
                              transport_options=options)  # fmt: skip
    ranks = RankedKV(local, made.rank_channels, lambda split: _heads_of(made, split))
    closing.insert(0, ranks)  # closed before the engines
    return ranks


def published(made: LLMEngine, ranks: RankedKV) -> NodeDescriptor:
    return dataclasses.replace(
        NodeDescriptor.from_bytes(ranks.local.descriptor()), tp_ranks=ranks.rank_descriptors()
    )


def _heads_of(made: LLMEngine, world: int) -> list[tuple[int, int]]:
    plans = [TPPlan(made.model_config, r, world).kv_heads for r in range(world)]
    return [(heads.start, heads.stop) for heads in plans]


def _settled(ranks: RankedKV, rid: str) -> bool:
    deadline = time.monotonic() + 20
    while (state := ranks.state(rid)[0]) is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.005)
    return state is TransferState.DONE


@pytest.mark.parametrize(
    ("model", "prefill_tp", "decode_tp"), [*CASES, ("llama", 2, 2), ("single-kv-head", 2, 2)]
)
def test_rank_to_rank_writes_every_decode_rank_the_heads_the_prefill_ranks_computed(
    model: str,
    prefill_tp: int,
    decode_tp: int,
    tiny_models: dict[str, Path],
    single_kv_head: Path,
    closing: list[LLMEngine],
) -> None:
    """Real engines whose worker ranks each run a torch transport (EngineConfig.rank_extension): the prefill ranks
    write, as each layer is stored, the heads each decode rank holds straight into its pool; nothing goes through
    rank 0. Every decode rank's blocks then hold, head by head, what the prefill ranks computed, and the tokens are
    a single TP 1 engine's."""
    model_dir = single_kv_head if model == "single-kv-head" else tiny_models[model]
    options = {"host": "127.0.0.1", "transfer_timeout_s": 20.0}
    sides = [
        engine(model_dir, role, tp, closing, rank_extension("torch", name, tp, options) if tp > 1 else None)
        for role, tp, name in ((EngineRole.PREFILL, prefill_tp, "p"), (EngineRole.DECODE, decode_tp, "d"))
    ]
    prefill, decode = sides
    transfer = RankToRank(prefill, decode, closing)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = prompts(prefill.tokenizer.vocab_size)[3]  # 95 tokens: five full blocks and a partial one
    want = engine(model_dir, EngineRole.COLOCATED, 1, closing).generate([prompt], params)[0].token_ids
    transfer.dst_blocks["one"] = dst = decode.reserve("one", prompt, params)
    done = _prefill_one(prefill, "one", prompt, params)
    computed = prefill.kv_blocks_by_rank(done.block_ids)
    transfer.hand_over("one", done)
    prefill.release("one")
    _assert_every_rank_holds_its_heads(prefill, computed, decode, decode.kv_blocks_by_rank(dst), len(prompt))
    tokens: list[int] = []  # the admitted first token comes out of the first step
    while decode.has_unfinished():
        tokens.extend(t for o in decode.step() for t in o.new_token_ids)
    assert tokens == want
