"""The engine thread behind asyncio: concurrent streams, cancellation frees blocks, errors reach the caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine, EngineStopped
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def make(llama_dir: Path) -> AsyncEngine:
    return AsyncEngine(LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=64)))


async def collect(engine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    stream = await engine.generate(rid, prompt, GREEDY)
    return [t async for out in stream for t in out.new_token_ids]


def test_concurrent_streams_equal_the_synchronous_engine(llama_dir: Path) -> None:
    prompts = [[5, 6, 7], list(range(10, 90)), list(range(3, 40))]
    expected = [
        c.token_ids for c in LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64)).generate(prompts, GREEDY)
    ]
    engine = make(llama_dir)

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect(engine, f"r{i}", p) for i, p in enumerate(prompts)))

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_closing_a_stream_mid_generation_aborts_and_frees_blocks(llama_dir: Path) -> None:
    engine = make(llama_dir)

    async def main() -> int:
        stream = await engine.generate(
            "long", list(range(3, 60)), SamplingParams(max_tokens=500, ignore_eos=True)
        )
        await anext(stream)
        stream.close()
        stream.close()
        return await engine.call(lambda e: e.stats().num_free_blocks)

    try:
        assert asyncio.run(main()) == 64
    finally:
        engine.shutdown()


def test_bad_input_raises_at_submission_and_the_engine_keeps_serving(llama_dir: Path) -> None:
    engine = make(llama_dir)

    async def main() -> list[int]:
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            await engine.generate("bad", [], GREEDY)
        return await collect(engine, "good", [5, 6, 7])

    try:
        assert len(asyncio.run(main())) == 20
    finally:
        engine.shutdown()


def test_shutdown_fails_open_streams_instead_of_hanging(llama_dir: Path) -> None:
    engine = make(llama_dir)

    async def main() -> None:
        stream = await engine.generate("r", [5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True))
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineStopped):
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass
        with pytest.raises(EngineStopped):
            await engine.call(lambda e: e.stats())

    asyncio.run(main())
