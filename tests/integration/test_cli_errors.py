"""Every user error of the `splitserve` command line is one line on stderr and a non-zero exit code, never a
traceback, and the line names the flag (or file) to fix: ports in use, missing or malformed files, unreachable
endpoints, bad flags, and a part of `up` that did not start.

Most cases fail before any model loads or process starts, so each takes about a second.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

CLI = [sys.executable, "-m", "ops.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TRACE = DATA / "azure-llm-inference-2023" / "conv.csv"
PERF_MODEL = DATA / "splitwise-perf-model" / "perf_model.csv"
REDIS_URL = "redis://127.0.0.1:1/0"  # never reached: each case fails before it is tried


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The one line a failed command printed; asserts non-zero exit, exactly one line, no traceback, fragments."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port someone else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def not_json(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text('{"machines": [')
    return path


# ---- ports in use --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_up_names_the_port_flag_to_change(flag: str, busy_port: int, llama_dir: Path) -> None:
    free = ["--grpc-port", "0", "--http-port", "0"]
    result = run("up", "--model", str(llama_dir), *free, flag, str(busy_port))
    line = error_line(result, f"port {busy_port} is in use (change {flag})")
    assert line.startswith("splitserve up: error:")


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_router_names_the_port_flag_to_change(flag: str, busy_port: int, llama_dir: Path) -> None:
    free = ["--grpc-port", "0", "--http-port", "0"]
    result = run("router", "--model", str(llama_dir), "--redis-url", REDIS_URL, *free, flag, str(busy_port))
    assert error_line(result) == f"splitserve router: error: port {busy_port} is in use (change {flag})"


@pytest.mark.parametrize(
    ("role", "flag"),
    [
        ("prefill", "--port"),
        ("decode", "--metrics-port"),
        ("colocated", "--port"),
        ("colocated", "--metrics-port"),
    ],
)
def test_nodes_name_the_port_flag_to_change(role: str, flag: str, busy_port: int, llama_dir: Path) -> None:
    result = run(role, "--model", str(llama_dir), "--redis-url", REDIS_URL, flag, str(busy_port))
    assert error_line(result) == f"splitserve {role}: error: port {busy_port} is in use (change {flag})"


@pytest.mark.parametrize("role", ["prefill", "decode", "router"])
def test_a_wildcard_host_needs_an_address_to_advertise(role: str, llama_dir: Path) -> None:
    for host in ("0.0.0.0", "::"):
        result = run(role, "--model", str(llama_dir), "--redis-url", REDIS_URL, "--host", host)
        error_line(result, f"--host {host} listens on every interface", "--advertise-host")
    result = run(role, "--model", str(llama_dir), "--redis-url", REDIS_URL, "--advertise-host", "0.0.0.0")
    error_line(result, "--advertise-host 0.0.0.0 is not an address others can dial")


def test_a_port_out_of_range_is_one_line() -> None:
    error_line(run("up", "--http-port", "70000"), "--http-port", "0..65535")


# ---- missing and malformed files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "x"],
        ["up"],
        ["prefill", "--redis-url", REDIS_URL],
        ["router", "--redis-url", REDIS_URL],
        ["profile", "--output", "perf.csv"],
    ],
)
def test_a_missing_model_directory_is_named(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    error_line(run(*command, "--model", str(missing)), f"--model {missing}: model directory does not exist")


@pytest.mark.parametrize(
    "command",
    [
        ["up", "--grpc-port", "0", "--http-port", "0"],
        ["decode", "--redis-url", REDIS_URL],
    ],
)
def test_a_missing_or_malformed_catalog_is_named(
    command: list[str], llama_dir: Path, not_json: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "absent.json"
    error_line(run(*command, "--model", str(llama_dir), "--machines", str(missing)), f"--machines {missing}")
    error_line(run(*command, "--model", str(llama_dir), "--machines", str(not_json)), str(not_json))


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_simulate_and_plan_name_a_missing_input(command: str, tmp_path: Path, not_json: Path) -> None:
    design = ["--design", "splitwise-hh", "--prefill", "1", "--decode", "1"] if command == "simulate" else []
    missing = tmp_path / "absent.csv"
    inputs = {"--trace": str(TRACE), "--perf-model": str(PERF_MODEL)}
    for flag in inputs:
        given = [word for pair in {**inputs, flag: str(missing)}.items() for word in pair]
        error_line(run(command, *given, *design), f"{flag} {missing}: No such file")
    given = [word for pair in inputs.items() for word in pair]
    error_line(
        run(command, *given, *design, "--machines", str(missing)), f"--machines {missing}: No such file"
    )
    error_line(run(command, *given, *design, "--machines", str(not_json)), str(not_json), "machine catalog")


def test_bench_names_a_missing_tokenizer_trace_or_baseline(
    tmp_path: Path, busy_port: int, llama_dir: Path
) -> None:
    endpoint = ["--endpoint", f"grpc://127.0.0.1:{busy_port}"]
    missing = tmp_path / "absent"
    error_line(run("bench", *endpoint, "--tokenizer", str(missing)), f"--tokenizer {missing}: No such file")
    error_line(
        run("bench", *endpoint, "--tokenizer", str(tmp_path)), f"--tokenizer {tmp_path}: no tokenizer.json"
    )
    tokenizer = ["--tokenizer", str(llama_dir)]
    for flag in ("--trace", "--baseline"):
        error_line(run("bench", *endpoint, *tokenizer, flag, str(missing)), f"{flag} {missing}: No such file")


def test_bench_names_a_malformed_trace_or_baseline(tmp_path: Path, busy_port: int, llama_dir: Path) -> None:
    # Something listens at the endpoint, so the run gets as far as reading its inputs.
    given = ["--endpoint", f"grpc://127.0.0.1:{busy_port}", "--tokenizer", str(llama_dir)]
    bad = tmp_path / "bad.csv"
    bad.write_text("when,what\n1,2\n")
    error_line(run("bench", *given, "--trace", str(bad)), str(bad))
    error_line(run("bench", *given, "--baseline", str(bad)), f"--baseline {bad}", "expected the columns")


def test_bench_compare_names_a_missing_or_malformed_results_file(tmp_path: Path, not_json: Path) -> None:
    missing = tmp_path / "absent.json"
    error_line(run("bench", "--compare", str(missing), str(not_json)), f"--compare {missing}: No such file")
    error_line(run("bench", "--compare", str(not_json), str(not_json)), f"--compare {not_json}: not JSON")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/else"}))
    error_line(run("bench", "--compare", str(other), str(other)), "not a splitserve bench results file")


# ---- unreachable endpoints, bad flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_bench_refuses_an_unreachable_endpoint_before_the_run(
    scheme: str, closed_port: int, llama_dir: Path, tmp_path: Path
) -> None:
    endpoint = f"{scheme}://127.0.0.1:{closed_port}" + ("/v1" if scheme == "http" else "")
    result = run("bench", "--endpoint", endpoint, "--tokenizer", str(llama_dir), "--num-requests", "2",
                 "--out", str(tmp_path / "out"), timeout=30)  # fmt: skip
    error_line(result, f"--endpoint {endpoint}: cannot connect to 127.0.0.1:{closed_port}")
    assert result.returncode == 2
    assert not (tmp_path / "out").exists(), "a run that never started wrote results"


def test_an_unreachable_redis_is_named_without_its_password(closed_port: int, llama_dir: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port}/0"
    for command in (["up", "--grpc-port", "0", "--http-port", "0"], ["colocated"]):
        line = error_line(
            run(*command, "--model", str(llama_dir), "--redis-url", url), "--redis-url redis://"
        )
        assert str(closed_port) in line and "hunter2" not in line, line


def test_bench_without_an_endpoint_or_with_another_scheme_is_one_line(llama_dir: Path) -> None:
    error_line(run("bench"), "--endpoint and --tokenizer are required")
    error_line(run("bench", "--endpoint", "tcp://127.0.0.1:1", "--tokenizer", str(llama_dir)), "--endpoint")


def test_usage_errors_are_one_line_too() -> None:
    error_line(run("make-tiny-model", "/tmp/x", "--arch", "gpt2"), "invalid choice: 'gpt2'", "--help")
    error_line(run("router"), "the following arguments are required: --model")
    error_line(run("no-such-command"), "invalid choice")


# ---- a part of `up` that does not start ----------------------------------------------------------------------------


def test_up_repeats_the_reason_of_a_node_that_did_not_start_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt-0"}))
    popen = subprocess.Popen(
        [*CLI, "up", "--model", str(model), "--grpc-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    started: set[psutil.Process] = set()
    try:
        while popen.poll() is None:  # the parts it starts, to see that none outlives it
            try:
                started |= set(psutil.Process(popen.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        _, stderr = popen.communicate(timeout=120)
    finally:
        popen.kill()
        popen.wait()
    result = subprocess.CompletedProcess(popen.args, popen.returncode, "", stderr)
    line = error_line(result, "gpt-0", "is not supported")
    assert line.startswith("splitserve up: error: prefill did not start:"), line
    assert started, "up started nothing: the failure was not a child's"
    # psutil.Process compares its start time too: a pid reused meanwhile by another process is not "running".
    leftovers = [p for p in started if _alive(p)]
    for process in leftovers:
        process.kill()
    assert not leftovers, f"left running: {leftovers}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
