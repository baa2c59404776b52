"""Times prefill and decode iterations by driving one engine step by step, as a node's engine thread does.

One trial of a point (P, B, T): B requests of P random prompt tokens are added, then
1. the first engine step prefills all B prompts at once (the engine's per-step budget is at least B * P tokens and
   its sequence limit at least B) and samples their first tokens: that step's wall time is the prompt time;
2. the next T - 1 steps each decode one token for all B requests (context P .. P + T): their median wall time is
   the token time (the median ignores the odd step a garbage collection or another process stretches).
A step's time includes scheduling, sampling and detokenizing, which a serving node pays on every step too.

Prefix caching is off and prompts are random, so no trial reuses another's KV; a trial that preempts (KV pool too
small) or does not batch as planned raises instead of recording a time that means something else.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from ops.profiling.results import Trial
from ops.profiling.sweep import EngineLimits, ProfilePoint

# Token ids below this are the tiny models' special tokens; random prompts avoid them (any id would do for timing).
_FIRST_ORDINARY_TOKEN = 3


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    dtype: str = "auto"
    device: str = "cpu"
    kv_cache_mb: int = 256
    max_batch_size: int = 64  # the largest batch any point prefills together
    max_batch_prompt_tokens: int = 32768  # the largest B * P any point prefills in one step
    seed: int = 0


class EngineProbe:
    """One colocated engine sized for a sweep; measure(point) runs one trial of a point."""

    def __init__(self, model_dir: Path, settings: ProbeSettings) -> None:
        config = EngineConfig(
            dtype=settings.dtype,
            device=settings.device,
            kv_cache_memory_bytes=settings.kv_cache_mb * 1024 * 1024,
            max_num_batched_tokens=settings.max_batch_prompt_tokens,
            max_num_seqs=settings.max_batch_size,
            enable_prefix_caching=False,
            seed=settings.seed,
        )
        self.engine = LLMEngine(model_dir, config)
        self._random = random.Random(settings.seed)
        self._next_id = 0

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(
            max_sequence_tokens=self.engine.max_seq_tokens,
            kv_blocks=self.engine.blocks.num_blocks,
            block_size=self.engine.config.block_size,
        )

    def measure(self, point: ProfilePoint) -> Trial:
        preemptions_before = self.engine.stats().num_preemptions
        self._add_batch(point)
        prompt_time_s, first = _timed_step(self.engine)
        if len(first) != point.batch_size:
            raise InvalidRequestError(
                f"{point.describe()}: the prefill step produced {len(first)} first tokens, expected "
                f"{point.batch_size}; the engine did not batch the whole prompt set in one step"
            )
        decode_times = []
        for _ in range(point.token_size):  # T - 1 decode steps are expected; one more shows an overrun
            if not self.engine.has_unfinished():
                break
            step_s, _ = _timed_step(self.engine)
            decode_times.append(step_s)
        if self.engine.stats().num_preemptions != preemptions_before:
            raise InvalidRequestError(f"{point.describe()}: the KV pool overflowed; raise --kv-cache-mb")
        if len(decode_times) != point.token_size - 1:
            raise InvalidRequestError(
                f"{point.describe()}: {len(decode_times)} decode steps, expected {point.token_size - 1}"
            )
        return Trial(point, prompt_time_s, statistics.median(decode_times))

    def _add_batch(self, point: ProfilePoint) -> None:
        vocab = self.engine.model_config.vocab_size
        params = SamplingParams(max_tokens=point.token_size, ignore_eos=True)
        for _ in range(point.batch_size):
            prompt = [self._random.randrange(_FIRST_ORDINARY_TOKEN, vocab) for _ in range(point.prompt_size)]
            self._next_id += 1
            self.engine.add_request(f"profile-{self._next_id}", prompt, params)


def _timed_step(engine: LLMEngine) -> tuple[float, list[object]]:
    # step() returns sampled token ids already on the host, so on CUDA the device work is done when it returns.
    start = time.perf_counter()
    outputs = engine.step()
    return time.perf_counter() - start, list(outputs)
