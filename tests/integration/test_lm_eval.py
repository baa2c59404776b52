"""lm-evaluation-harness itself (its `local-completions` model, `--batch_size 4`) against a live split cluster.

Its multiple-choice requests are batches of token-id prompts with `echo`, `logprobs: 1` and `max_tokens: 1`; it sums
the echoed logprobs of each choice's continuation. Those sums must equal the single-process engine's teacher-forced
logprobs of the same tokens (fp32; tolerance 1e-3 on a sum of a few tokens, where a wrong token or position is off by
whole units). A generate_until task must complete with greedy text equal to the engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
TASKS = Path(__file__).parent / "lm_eval_tasks"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    ) as running:
        yield running


def run_lm_eval(cluster: LocalCluster, llama_dir: Path, task: str, tmp_path: Path) -> list[dict]:
    """Run the lm_eval CLI on one local task; return its logged samples."""
    include = tmp_path / "tasks"
    include.mkdir(exist_ok=True)
    for name in ("splitserve_mc.yaml", "splitserve_gen.yaml"):
        (include / name).write_text((TASKS / name).read_text().replace("DATA_DIR", str(TASKS)))
    out = tmp_path / f"out-{task}"
    model_args = ",".join(
        [
            f"model={llama_dir.name}",
            f"base_url=http://{cluster.http_address}/v1/completions",
            f"tokenizer={llama_dir}",
            "tokenizer_backend=huggingface",
            "num_concurrent=1",
            "max_retries=1",
            "max_length=2048",
        ]
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HOME": str(tmp_path / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
        "--tasks", task, "--include_path", str(include), "--batch_size", "4", "--log_samples",
        "--output_path", str(out), "--seed", "1234",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    [samples_file] = list(out.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own split of a (context, continuation) pair into token ids (trailing spaces go with the
    continuation; no special tokens, as its local-completions model sends them)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def arguments_of(sample: dict) -> list[tuple[str, ...]]:
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}
        return [tuple(v for _, v in sorted(a.items())) for _, a in sorted(args.items())]
    return [tuple(a) for a in args]


def test_multiple_choice_loglikelihoods_equal_the_engines(
    cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    samples = run_lm_eval(cluster, llama_dir, "splitserve_mc", tmp_path)
    assert len(samples) == 6
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64))
    compared = 0
    for sample in samples:
        for (context, continuation), response in zip(arguments_of(sample), sample["resps"], strict=True):
            served = float(response[0][0])
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            [reference] = engine.generate(
                [context_ids + continuation_ids],
                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            )
            expected = sum(lp.logprob for lp in reference.prompt_logprobs[len(context_ids) - 1 :])
            assert abs(served - expected) < TOLERANCE, (context, continuation, served, expected)
            compared += 1
    assert compared == 18


def test_generate_until_returns_the_engines_greedy_text(
    cluster: LocalCluster, llama_dir: Path, tmp_path: Path
) -> None:
    samples = run_lm_eval(cluster, llama_dir, "splitserve_gen", tmp_path)
    assert len(samples) == 3
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64))
    for sample in samples:
        [(context, gen_kwargs)] = arguments_of(sample)
        until = list(gen_kwargs["until"])
        [reference] = engine.generate(
            [tokenizer(context, add_special_tokens=False).input_ids],
            SamplingParams(max_tokens=12, temperature=0.0, stop=until),
        )
        assert sample["resps"][0][0] == reference.text, (context, sample["resps"], reference.text)
