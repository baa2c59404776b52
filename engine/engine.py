"""LLMEngine: one model, one paged KV pool, one scheduler; the same code path for all three roles.

Request life cycle by role:
- colocated: add_request -> waiting -> running (prompt in chunks, then one token per step) -> finished.
- prefill:   add_request -> waiting -> running (prompt) -> first token sampled -> PREFILLED: the output carries a
             KVHandoff (block ids + per-layer cache tensors); the blocks stay held until release(request_id).
             A hook set with set_kv_layer_hook is called after every layer's KV write, for layer-wise streaming.
- decode:    reserve(prompt) -> RESERVED (blocks held, KV written into them from outside) -> admit(first token)
             -> running (one token per step) -> finished.
Finished, aborted and released requests give every block back exactly once.
Prompt logprobs (engine/prompt_logprobs.py) are computed with the prompt's chunks and ride on its first output.
Structured outputs (engine/structured_output.py): the sampler masks what a request's grammar forbids, and every
output token, wherever it was sampled, advances the request's matcher.

Fault isolation (engine/fault_isolation.py): an exception raised while computing one request fails that request
alone: its blocks are freed, take_failures() reports it (RequestFailedError) and the other requests go on. Only an
engine that fails every forward raises out of step() (EngineBrokenError).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from engine import decode_graphs, tp_ranks
from engine.block_manager import BlockManager
from engine.config import EngineConfig, EngineRole, ModelConfig
from engine.devices import resolve_device, resolve_dtype
from engine.errors import (
    EngineBrokenError,
    InvalidRequestError,
    ModelLoadError,
    RequestFailedError,
    ResourceExhaustedError,
    UnknownRequestError,
)
from engine.fault_injection import FaultInjector
from engine.fault_isolation import ForwardGuard, sample_isolated
from engine.model_runner import ModelRunner, StepLogits
from engine.models.decoder import DecoderModel
from engine.outputs import (
    NO_WORK,
    Completion,
    EngineLoad,
    EngineStats,
    KVHandoff,
    KVLayerHook,
    KVLayerWrite,
    KVStepPlan,
    KVStepPlanner,
    RequestOutput,
)
from engine.prefix_import import PrefixImport
from engine.prompt_logprobs import record as record_prompt_logprobs
from engine.prompt_logprobs import take_for_output
from engine.request_intake import RequestIntake
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from engine.tensor_parallel import CollectiveFailed
from engine.tensor_parallel.rank_calls import RankChannel

__all__ = [  # the output types live in engine.outputs; importing them from here keeps working
    "Completion",
    "EngineLoad",
    "EngineStats",
    "KVHandoff",
    "KVLayerHook",
    "KVLayerWrite",
    "LLMEngine",
    "RequestOutput",
]
from engine.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"{model_dir}: model directory does not exist")
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, self.model_config.torch_dtype, device)
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        world = self.config.tensor_parallel
        plan = tp_ranks.plan_for(self.model_config, world)  # None at TP 1
        self.model = DecoderModel.load(model_dir, self.model_config, dtype, device, self.max_model_len, plan)
        num_blocks = self.config.num_kv_blocks or max(
            1, self.config.kv_cache_memory_bytes // self._bytes_per_block_on_this_rank()
        )
        self.runner = ModelRunner(self.model, num_blocks, self.config.block_size)
        # Ranks 1..N-1, each with its shard and its own KV heads' pool of num_blocks blocks, running rank 0's steps.
        self.tp_group = tp_ranks.start_ranks(model_dir, self.config, self.runner, self.max_model_len)
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_batched_tokens, self.config.max_num_seqs)
        # A lone sequence must always fit in the pool, or preemption could never make room for it.
        self.max_seq_tokens = min(self.max_model_len, num_blocks * self.config.block_size)
        if decode_graphs.enabled(device, self.config.cuda_graphs) and self.tp_group is None:
            self.runner.enable_decode_graphs(self.config.max_num_seqs, self.max_seq_tokens)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | self.tokenizer.eos_token_ids
        limit = "context" if self.max_seq_tokens == self.max_model_len else "KV cache capacity"
        self.intake = RequestIntake(
            self.tokenizer, self.model_config.vocab_size, self.max_seq_tokens, limit, self.eos_token_ids
        )
        self._seqs: dict[str, Sequence] = {}
        self._held: dict[str, Sequence] = {}  # RESERVED or PREFILLED: blocks held outside the scheduler
        self.prefix_imports: dict[
            str, PrefixImport
        ] = {}  # blocks being written from outside (prefix_import.py)
        self._pending: list[RequestOutput] = []
        self._admitted = 0
        self._preemptions = 0
        self._kv_layer_hook: KVLayerHook | None = None
        self._kv_step_planner: KVStepPlanner | None = None
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self._failures: list[RequestFailedError] = []  # failed since the last take_failures()
        self._fault = FaultInjector.from_env()  # a test hook; None in production
        self._guard = ForwardGuard(self._forward, isolate=self.tp_group is None)
        self.last_step = NO_WORK  # what the latest step() computed, per request

    def _bytes_per_block_on_this_rank(self) -> int:
        """KV bytes a block costs this process: its KV heads' share, plus, for a tensor-parallel prefill or decode
        engine, the block of the transfer pool with every KV head (engine/tensor_parallel/kv_resharding.py)."""
        own = ModelRunner.bytes_per_block(self.model, self.config.block_size)
        if self.config.tensor_parallel == 1 or self.config.role == EngineRole.COLOCATED:
            return own
        return own * self.model_config.num_kv_heads // self.model.config.num_kv_heads + own

    def close(self) -> None:
        """Stop the tensor-parallel worker ranks, if any (bounded; idempotent). The engine cannot step afterwards."""
        if self.tp_group is not None:
            self.tp_group.close()

    def check_ranks(self) -> None:
        """EngineBrokenError if a tensor-parallel worker rank is gone (checked while idle; steps check it too)."""
        if self.tp_group is not None:
            self.tp_group.check_alive()

    # ---- requests -------------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        prior_output: list[int] | None = None,
        keep_local: bool = False,
    ) -> None:
        """Queue a request. Raises InvalidRequestError for bad input; nothing is queued then.

        prior_output resumes a request whose first tokens were already delivered (its node died mid-stream): they
        are recomputed as context and count as output, so the continuation is what the lost node would have made.
        keep_local: on a prefill engine, run the request to the end here instead of handing its KV over.
        """
        seq = self._new_sequence(request_id, prompt, params or SamplingParams(), prior_output)
        seq.hands_over = self.config.role == EngineRole.PREFILL and not keep_local
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request in any state and free its blocks; unknown or finished ids are ignored."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        self._held.pop(request_id, None)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self._pending)

    def take_failures(self) -> list[RequestFailedError]:
        """Requests that failed inside the engine since the last call; each is gone, its blocks free."""
        failures, self._failures = self._failures, []
        return failures

    def set_kv_layer_hook(self, hook: KVLayerHook | None, planner: KVStepPlanner | None = None) -> None:
        """Prefill role: hook(layer, writes) runs right after each layer's new KV is in the cache.

        planner(writes), if given, runs once per step before the forward: its KVStepPlan's layer plan (picklable) goes
        to the tensor-parallel worker ranks' extensions with the step (rank_calls.py), and the requests it exempts are
        not mirrored into rank 0's transfer pool."""
        self._kv_layer_hook = hook
        self._kv_step_planner = planner

    @property
    def rank_channels(self) -> list[RankChannel]:
        """Calls to the worker ranks' extensions (EngineConfig.rank_extension), rank 1's first; empty at TP 1."""
        return [] if self.tp_group is None else list(self.tp_group.channels)

    # ---- prefill role: hand-over ----------------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """Free the blocks of a prefilled request once its KV has been copied out."""
        seq = self._held.get(request_id)
        if seq is None or seq.status != SequenceStatus.PREFILLED:
            raise UnknownRequestError(f"no prefilled request {request_id!r} to release")
        self._forget(seq)

    # ---- decode role: reserve, receive KV, admit --------------------------------------------------------------------

    @property
    def kv_layers(self) -> list[torch.Tensor]:
        """Per-layer KV pool tensors [num_blocks, 2, block_size, KVH, D]; transports read and write blocks here.

        At tensor parallel > 1 this is rank 0's transfer pool, every KV head (engine/tensor_parallel/kv_resharding.py):
        blocks written into it from outside need `import_blocks`, blocks read from it on a decode node
        `export_blocks` first (a prefill node keeps it up to date as it computes)."""
        return self.runner.transfer_pool

    def import_blocks(self, block_ids: list[int]) -> None:
        """Blocks written into kv_layers from outside: every tensor-parallel rank takes its heads before the next
        step (nothing to do at TP 1, where kv_layers is the pool itself)."""
        self.runner.queue_kv_import(block_ids)

    def export_blocks(self, block_ids: list[int]) -> None:
        """Make kv_layers hold what the ranks computed in these blocks (no-op at TP 1); EngineBrokenError if a rank
        is gone."""
        with _ranks_in_step():
            self.runner.export_to_transfer_pool(block_ids)

    def kv_blocks_by_rank(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Each tensor-parallel rank's own blocks [layers, n, 2, block_size, its KV heads, D], rank 0 first."""
        with _ranks_in_step():
            return self.runner.blocks_by_rank(block_ids)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        prior_output: list[int] | None = None,
    ) -> list[int]:
        """Hold blocks for a prompt (and any prior output) whose KV will be written from outside.

        The leading blocks this engine's prefix cache already holds for these tokens are shared, not reserved anew
        (`cached_blocks(request_id)` says how many; the writer skips them); the block of the last token is always
        fresh. Raises ResourceExhaustedError if the pool is short.
        """
        if self.config.role == EngineRole.PREFILL:
            raise InvalidRequestError("reserve is not available on an engine in the prefill role")
        seq = self._new_sequence(request_id, list(prompt_token_ids), params or SamplingParams(), prior_output)
        seq.prompt_logprobs = None  # the prompt is computed elsewhere: its prefill engine reports them
        self.blocks.admit_with_prefix_cache(seq)
        if not self.blocks.ensure_capacity(seq, seq.num_tokens):
            shared = len(seq.block_ids)
            self.blocks.free(seq)  # the cached blocks it shared
            raise ResourceExhaustedError(
                f"need {self.blocks.blocks_for(seq.num_tokens) - shared} KV blocks for {request_id!r}, "
                f"{self.blocks.num_free_blocks} free"
            )
        self.blocks.record_admission(seq)
        seq.status = SequenceStatus.RESERVED
        self._seqs[request_id] = seq
        self._held[request_id] = seq
        return list(seq.block_ids)

    def reserved_sequence(self, request_id: str) -> Sequence | None:
        """A reserved request's sequence (None if request_id holds no reservation)."""
        seq = self._held.get(request_id)
        return seq if seq is not None and seq.status == SequenceStatus.RESERVED else None

    def cached_blocks(self, request_id: str) -> int:
        """How many leading blocks of a reserved request were shared from the prefix cache (0 if unknown)."""
        seq = self._held.get(request_id)
        return 0 if seq is None else self._cached_blocks_of(seq)

    def _cached_blocks_of(self, seq: Sequence) -> int:
        return seq.num_cached_prompt_tokens // self.config.block_size

    def admit(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None = None,
        kv_in_ranks: bool = False,
    ) -> None:
        """The prompt's KV is in the reserved blocks: start generating after the prefill engine's first token.

        kv_in_ranks: at tensor parallel > 1, the KV was written into each rank's own pool (rank to rank), not into
        kv_layers, so there is nothing to import."""
        seq = self._held.get(request_id)
        if seq is None or seq.status != SequenceStatus.RESERVED:
            raise UnknownRequestError(f"no reserved request {request_id!r} to admit")
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise InvalidRequestError(f"first token id {first_token_id} is outside the vocabulary")
        del self._held[request_id]
        if not kv_in_ranks:
            self.import_blocks(seq.block_ids[self._cached_blocks_of(seq) :])  # the blocks the transport wrote
        seq.num_computed_tokens = seq.num_tokens
        self.blocks.register_computed_blocks(seq)
        self.scheduler.add_running(seq)
        out = self._record_token(seq, SampledToken(first_token_id, first_logprob))
        if out is None:
            raise self._failures.pop()  # the caller hears it: the stream was not delivering yet
        self._pending.append(out)

    # ---- the step ---------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return a delta for every request that produced a token (or finished) in it.

        `last_step` then says which tokens the batch computed for which request."""
        outputs, self._pending = self._pending, []
        self.last_step = NO_WORK
        if not self.scheduler.has_work:
            return outputs
        sched = self.scheduler.schedule()
        self._preemptions += len(sched.preempted)
        if not sched.chunks:
            return outputs
        self.last_step = sched.work()
        computed = self._guard.run(sched)  # raises EngineBrokenError only when nothing can be computed
        for seq, exc in computed.failed:
            self._fail(seq, "the model forward", exc)
        completing = [c.seq for c in computed.chunks if c.completes_sequence]  # before the counts move on
        for chunk in computed.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.blocks.register_computed_blocks(chunk.seq)
        record_prompt_logprobs(computed.prompt_logprobs)  # before sampling: the first output carries them
        if computed.logits is None:
            return outputs
        for seq, sampled in zip(
            completing, sample_isolated(computed.logits, completing, self._rng), strict=True
        ):
            if isinstance(sampled, Exception):
                self._fail(seq, "sampling", sampled)
                continue
            out = self._record_token(seq, sampled)
            if out is not None:
                outputs.append(out)
        return outputs

    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order.

        A prompt that fails inside the engine raises its RequestFailedError (the others are aborted then)."""
        prompts = list(prompts)
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"generate-{self._admitted + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, per_prompt, strict=True):
            self.add_request(request_id, prompt, p)
        done: dict[str, Completion] = {}
        seqs = {rid: self._seqs[rid] for rid in ids}
        while len(done) < len(ids) and self.has_unfinished():
            for out in self.step():
                if out.finished and out.request_id in seqs:
                    seq = seqs[out.request_id]
                    done[out.request_id] = Completion.of(seq)
            failed = [f for f in self.take_failures() if f.request_id in seqs]
            if failed:
                for rid in ids:
                    self.abort(rid)
                raise failed[0]
        return [done[rid] for rid in ids]

    def load(self) -> EngineLoad:
        """Current load; call it from the thread that steps the engine."""
        queued = sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.waiting)
        queued += sum(max(0, s.num_tokens - s.num_computed_tokens - 1) for s in self.scheduler.running)
        return EngineLoad(
            queued_prompt_tokens=queued,
            running_requests=len(self.scheduler.running),
            waiting_requests=len(self.scheduler.waiting),
            free_kv_blocks=self.blocks.num_free_blocks,
            total_kv_blocks=self.blocks.num_blocks,
            prefix_queried_blocks=self.blocks.stats.queried_blocks,
            prefix_hit_blocks=self.blocks.stats.hit_blocks,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_held=len(self._held),
            num_preemptions=self._preemptions,
            prefix_cache=self.blocks.stats,
        )

    # ---- internals --------------------------------------------------------------------------------------------------

    def _new_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prior_output: list[int] | None = None,
    ) -> Sequence:
        if isinstance(request_id, str) and request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = self.intake.new_sequence(request_id, prompt, params, prior_output)
        self._admitted += 1
        return seq

    def _append_token(self, seq: Sequence, sampled: SampledToken) -> RequestOutput:
        """Record a sampled token, update text and stop state, and describe the change as a delta."""
        token, params = sampled.token_id, seq.params
        if seq.grammar is not None:  # a token its grammar forbids raises: the request fails
            seq.grammar.accept(token)
        seq.output_token_ids.append(token)
        seq.output_counts[token] = seq.output_counts.get(token, 0) + 1
        if sampled.logprob is not None:
            seq.logprobs.append(sampled.logprob)
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        delta = ""
        if not stop_token and seq.detokenizer is not None:
            delta = seq.text.feed(seq.detokenizer.push(token))
        reason = None
        if stop_token or seq.text.stopped_at is not None:
            reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_seq_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            if seq.text.stopped_at is None and seq.detokenizer is not None:
                # What the detokenizer held back (a trailing partial character) is part of this last delta.
                delta += seq.text.feed(seq.detokenizer.flush())
            delta += seq.text.flush()
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_text=delta,
            new_logprobs=[sampled.logprob] if sampled.logprob is not None else [],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            prompt_logprobs=take_for_output(seq),
        )

    def _record_token(self, seq: Sequence, sampled: SampledToken) -> RequestOutput | None:
        """Append a token and finish or hand over the sequence if it is done; None if that failed (seq dropped)."""
        try:
            out = self._append_token(seq, sampled)
            if seq.is_finished:
                self._finish(seq)
            elif seq.hands_over:
                out = self._hand_over(seq, out)
        except Exception as exc:  # detokenizer, stop strings, hand-over: this request's trouble only
            self._fail(seq, "recording its token", exc)
            return None
        return out

    def _fail(self, seq: Sequence, where: str, exc: Exception) -> None:
        """Drop one request whose computation raised; its blocks go back (once) and take_failures() reports it."""
        if self._seqs.get(seq.request_id) is seq:  # else already forgotten (it finished before the error)
            self.scheduler.remove(seq)
            self._forget(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        self._failures.append(
            RequestFailedError(seq.request_id, f"{where} raised {type(exc).__name__}: {exc}")
        )

    def _forward(self, sched: SchedulerOutput) -> StepLogits:
        hook, plan, mirrored = self._layer_hook_for(sched)
        if self._fault is not None:
            hook = self._fault.around(hook, (c.seq for c in sched.chunks))
        return self.runner.run(sched, hook, plan, mirrored)

    def _hand_over(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        """Prefill role: stop after the first token and keep the blocks for the transport."""
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.PREFILLED
        seq.finish_reason = FinishReason.PREFILL_DONE
        self._held[seq.request_id] = seq
        out.finished = True
        out.finish_reason = FinishReason.PREFILL_DONE
        out.kv = KVHandoff(
            block_ids=list(seq.block_ids),
            num_tokens=seq.num_computed_tokens,  # prompt (+ prior output of a resumed request)
            kv_layers=self.runner.transfer_pool,
            first_token_id=seq.output_token_ids[-1],
            first_logprob=seq.logprobs[-1] if seq.logprobs else None,
        )
        return out

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self._held.pop(seq.request_id, None)
        self._seqs.pop(seq.request_id, None)

    def _layer_hook_for(
        self, sched: SchedulerOutput
    ) -> tuple[Callable[[int], None] | None, KVStepPlan | None, list[int] | None]:
        """The step's layer hook on this rank, its plan (None: none), and the slots mirrored into a tensor-parallel
        transfer pool (None: all)."""
        hook = self._kv_layer_hook
        if hook is None or self.config.role != EngineRole.PREFILL:
            return None, None, None
        writes = sched.kv_writes(self.config.block_size)
        plan = self._kv_step_planner(writes) if self._kv_step_planner is not None else None
        mirrored = None
        if plan is not None and self.runner.resharding is not None:
            bs = self.config.block_size
            mirrored = [
                w.block_ids[p // bs - w.start // bs] * bs + p % bs
                for w in writes
                if w.request_id not in plan.unmirrored
                for p in range(w.start, w.end)
            ]
        return (lambda layer: hook(layer, writes)), plan, mirrored


@contextlib.contextmanager
def _ranks_in_step() -> Iterator[None]:
    """A collective outside a step that fails leaves the tensor-parallel ranks out of step: the engine is broken."""
    try:
        yield
    except CollectiveFailed as exc:
        raise EngineBrokenError(f"tensor-parallel ranks out of step: {exc}") from exc
