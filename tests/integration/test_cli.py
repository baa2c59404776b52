"""The `splitserve` command line: make a model, stream a generation, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "ops.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_make_tiny_model_then_generate_streams_text(tmp_path: Path) -> None:
    made = run(
        "make-tiny-model",
        str(tmp_path / "m"),
        "--arch",
        "qwen3",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--vocab",
        "600",
        "--seed",
        "3",
    )
    assert made.returncode == 0, made.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (
        config["model_type"] == "qwen3"
        and config["num_key_value_heads"] == 1
        and config["num_hidden_layers"] == 1
    )
    gen = run(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "hello there",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "5",
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip(), "no text streamed"
    again = run(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "hello there",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "5",
    )
    assert again.stdout == gen.stdout
    # Split over two processes (half of the query heads each, the single KV head on both): the same text.
    tp2 = run(*again.args[3:], "--tensor-parallel", "2")
    assert tp2.returncode == 0, tp2.stderr
    assert tp2.stdout == gen.stdout
    odd = run(*again.args[3:], "--tensor-parallel", "3")
    assert (
        odd.returncode != 0
        and "tensor parallel 3 does not divide the model's 4 attention heads" in odd.stderr
    )
    assert len(odd.stderr.strip().splitlines()) == 1, odd.stderr


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


def test_bad_sampling_value_is_one_line_exit_2(llama_dir: Path) -> None:
    one_line_error(
        run("generate", "--model", str(llama_dir), "--prompt", "x", "--top-p", "0"), "top_p must be in (0, 1]"
    )
    one_line_error(
        run("generate", "--model", str(llama_dir), "--prompt", "x", "--max-tokens", "0"),
        "max_tokens must be >= 1",
    )
    one_line_error(
        run("generate", "--model", str(llama_dir), "--prompt", "x", "--temperature", "-1"),
        "temperature must be >= 0",
    )


def test_prompt_longer_than_context_is_one_line_exit_2(llama_dir: Path) -> None:
    one_line_error(
        run("generate", "--model", str(llama_dir), "--prompt", "word " * 3000), "the model's context is"
    )


def test_missing_model_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    one_line_error(
        run("generate", "--model", str(tmp_path / "absent"), "--prompt", "x"),
        "model directory does not exist",
    )


def test_truncated_weights_are_one_line_exit_2(llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:1000])
    one_line_error(run("generate", "--model", str(model), "--prompt", "x"), "truncated safetensors file")


def test_bad_flag_is_exit_2() -> None:
    result = run("make-tiny-model", "/tmp/x", "--arch", "gpt2")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_up_refuses_an_unknown_machine_type_or_policy_before_starting_anything() -> None:
    one_line_error(run("up", "--decode-machine-type", "dgx-z100"), "unknown machine type 'dgx-z100'")
    one_line_error(run("up", "--policy", "cheapest"), "unknown placement policy 'cheapest'")
