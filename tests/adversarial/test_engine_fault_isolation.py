"""One request that fails inside the engine fails alone; an engine that fails every forward stops for good.

The failure is forced with the engine's test hook (engine/fault_injection.py: SPLITSERVE_TEST_FAIL_MARKER), which
raises mid-forward for every batch holding a prompt with the marker token, so the batched path really fails.
Outputs of the other requests are compared token for token with an engine that never saw the poison request.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine, EngineStopped
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import EngineBrokenError, RequestFailedError
from engine.fault_injection import ENV_VAR
from engine.fault_isolation import MAX_FAILED_FORWARDS_IN_A_ROW
from engine.sampling_params import SamplingParams

MARKER = 1023  # the tiny model's last token id; the other prompts draw from 3..999
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def new_engine(model: Path) -> LLMEngine:
    return LLMEngine(model, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256))


def run_all(engine: LLMEngine, ids: list[str]) -> tuple[dict[str, list[int]], dict[str, RequestFailedError]]:
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    failures: dict[str, RequestFailedError] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        failures.update({f.request_id: f for f in engine.take_failures()})
    assert not engine.has_unfinished(), "the engine did not finish within 500 steps"
    return tokens, failures


def test_a_request_failing_mid_forward_fails_alone(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = prompts(6, seed=1)
    expected = [c.token_ids for c in new_engine(llama_dir).generate(batch, GREEDY)]
    monkeypatch.setenv(ENV_VAR, str(MARKER))
    engine = new_engine(llama_dir)
    ids = [f"ok-{i}" for i in range(len(batch))]
    for rid, prompt in zip(ids, batch, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    engine.add_request("poison", [5, 6, MARKER, 7], GREEDY)  # scheduled in the same batch as the others
    tokens, failures = run_all(engine, [*ids, "poison"])
    assert set(failures) == {"poison"}
    assert "injected fault" in str(failures["poison"])
    assert tokens["poison"] == []
    assert [tokens[rid] for rid in ids] == expected
    assert engine.stats().num_free_blocks == engine.stats().num_blocks  # every block back, the poison's too
    # The engine is still good for more work.
    assert [c.token_ids for c in engine.generate(batch[:2], GREEDY)] == expected[:2]


def test_a_request_whose_sampling_raises_fails_alone(llama_dir: Path) -> None:
    batch = prompts(3, seed=2)
    engine = new_engine(llama_dir)
    expected = [c.token_ids for c in engine.generate(batch, GREEDY)]
    broken = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    ids = [f"ok-{i}" for i in range(len(batch))]
    for rid, prompt in zip(ids, batch, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    engine.add_request("nan", batch[0], broken)
    broken.temperature = float("nan")  # past validation: what a sampler bug would look like
    tokens, failures = run_all(engine, [*ids, "nan"])
    assert set(failures) == {"nan"} and "sampling" in str(failures["nan"])
    assert [tokens[rid] for rid in ids] == expected
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_generate_raises_the_failure_of_its_own_prompt(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(MARKER))
    engine = new_engine(llama_dir)
    with pytest.raises(RequestFailedError, match="injected fault"):
        engine.generate([[4, MARKER], [4, 5, 6]], GREEDY)
    assert not engine.has_unfinished()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_an_engine_failing_every_forward_gives_up(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "*")
    engine = new_engine(llama_dir)
    for i in range(MAX_FAILED_FORWARDS_IN_A_ROW - 1):  # alone, each looks like one bad request
        engine.add_request(f"r{i}", [4, 5, 6], GREEDY)
        engine.step()
        assert [f.request_id for f in engine.take_failures()] == [f"r{i}"]
    engine.add_request("last", [4, 5, 6], GREEDY)
    with pytest.raises(EngineBrokenError, match="forwards in a row failed"):
        engine.step()


def test_async_engine_fails_one_stream_and_serves_the_rest(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = prompts(8, seed=4)
    expected = [c.token_ids for c in new_engine(llama_dir).generate(batch, GREEDY)]
    monkeypatch.setenv(ENV_VAR, str(MARKER))
    engine = AsyncEngine(new_engine(llama_dir))

    async def collect(rid: str, prompt: list[int]) -> list[int] | BaseException:
        tokens: list[int] = []
        try:
            async for out in await engine.generate(rid, prompt, GREEDY):
                tokens += out.new_token_ids
        except RequestFailedError as exc:
            return exc
        return tokens

    async def main() -> list[list[int] | BaseException]:
        poison = collect("poison", [8, MARKER, 9])
        return await asyncio.wait_for(
            asyncio.gather(poison, *(collect(f"ok-{i}", p) for i, p in enumerate(batch))), 60
        )

    try:
        poison, *others = asyncio.run(main())
        assert isinstance(poison, RequestFailedError) and poison.request_id == "poison"
        assert others == expected
        assert engine.running and engine.fatal_error is None
    finally:
        engine.shutdown()


def test_async_engine_that_dies_tells_every_stream_and_its_owner(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "*")
    engine = AsyncEngine(new_engine(llama_dir))

    async def main() -> tuple[list[BaseException], BaseException]:
        async def one(i: int) -> BaseException:
            try:
                async for _ in await engine.generate(f"r{i}", [4, 5, 6 + i], GREEDY):
                    pass
            except (RequestFailedError, EngineStopped) as exc:
                return exc
            raise AssertionError("a request succeeded on an engine that fails every forward")

        errors = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 60)
        fatal = await asyncio.wait_for(engine.wait_fatal(), 10)
        return list(errors), fatal

    try:
        errors, fatal = asyncio.run(main())
        assert isinstance(fatal, EngineBrokenError)
        assert engine.fatal_error is fatal and not engine.running
        assert all(isinstance(e, RequestFailedError | EngineStopped) for e in errors)
        assert any(isinstance(e, EngineStopped) for e in errors)  # those still queued when it died
    finally:
        engine.shutdown()
