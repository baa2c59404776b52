"""The README tells the truth: its command blocks run as written (issue 13).

Every ```sh and ```python block of README.md is one of:
- set-up: the `make run` / `make test` block. Not run here: `make test` runs this very suite, and `make run` is
  `splitserve up` (checked with `make -n`), which the cluster test below starts itself;
- a server: it starts a cluster with `splitserve up` and stays in the foreground until Ctrl-C;
- a client: it talks to a running cluster (it names one of the README's endpoints, 127.0.0.1:8000/8001/50051/50052);
- local: anything else. It runs at once.

Blocks run in a scratch copy of the repository's top level (symlinks, so that what they write under `out/` stays
out of the checkout), beside a `shared` link to the data sets, with the README's own activation block first, as a
user who followed it would. Clusters get free ports instead of the README's, so that a `make run` on this machine
does not collide with the test. Runs that take minutes as written are shrunk by the substitutions in SHRINK (fewer
bench requests, a shorter plan sample); each must still match its block, so a README change cannot leave one stale.
grpcurl blocks are skipped where grpcurl is not installed (it is not a Python package).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
CLUSTER_PORTS = ("127.0.0.1:8000", "127.0.0.1:50051", "127.0.0.1:8001", "127.0.0.1:50052")
# (block text as written, what the test runs instead): the full runs take minutes on two cores.
SHRINK = (
    ("--num-requests 200", "--num-requests 6"),
    ("--num-requests 50", "--num-requests 4"),
    ("--jobs 2 --output out/plan.json",
     "--jobs 1 --limit 1000 --design baseline-a100 --design splitwise-aa --output out/plan.json"),
    ("--jobs 2 --output out/plan-min-cost.json", "--jobs 1 --limit 1000 --output out/plan-min-cost.json"),
)  # fmt: skip
BLOCK_TIMEOUT_S = 120
READY_TIMEOUT_S = 90


@dataclass(frozen=True)
class Block:
    lang: str  # "sh" or "python"
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def kind(self) -> str:
        if self.lang == "sh" and re.search(r"^make (run|test)\b", self.text, re.M):
            return "setup"
        if self.lang == "sh" and re.search(r"^splitserve up\b", self.text, re.M):
            return "server"
        if any(address in self.text for address in CLUSTER_PORTS):
            return "client"
        return "local"


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(sh|python)", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()
ACTIVATE = next(b for b in BLOCKS if b.text.strip() == ". .venv/bin/activate")


def shrunk(text: str) -> str:
    for old, new in SHRINK:
        text = text.replace(old, new)
    return text


HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A port the kernel handed out for port 0 lies in the ephemeral range, where the clusters' own processes (nodes
    that bind port 0, Redis, every outgoing connection) take ports while the test's router is still starting: a CI
    run lost its router port that way. Below the range only an explicit bind can take a port.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low) if low > 20000 else rng.randrange(1024, 20000)
        if port in HANDED_OUT_PORTS:  # handed out but not bound yet
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        HANDED_OUT_PORTS.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range after 200 tries")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch repository root whose entries link to the real ones (not out/), with ../shared beside it."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"the README's data sets are read from {SHARED / 'data'}, which is missing")
    base = tmp_path_factory.mktemp("readme")
    repo = base / "repo"
    repo.mkdir()
    (
        repo / ".cache"
    ).mkdir()  # `up` makes .cache/demo-model here; a link to the checkout's would race `make run`
    for entry in ROOT.iterdir():
        if entry.name not in ("out", ".cache", ".git"):
            (repo / entry.name).symlink_to(entry)
    (base / "shared").symlink_to(SHARED)
    return repo


def block_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_block(block: Block, cwd: Path, text: str | None = None) -> subprocess.CompletedProcess[str]:
    text = block.text if text is None else text
    if block.lang == "python":
        argv = [sys.executable, "-c", text]
    else:  # as a user who ran the README's activation block in this shell
        argv = ["bash", "-e", "-o", "pipefail", "-c", ACTIVATE.text + text]
    out = subprocess.run(
        argv, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    assert out.returncode == 0, (
        f"README line {block.line}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    )
    return out


def test_every_block_is_run_somewhere_and_every_shrink_applies() -> None:
    kinds = [b.kind for b in BLOCKS]
    assert kinds.count("setup") == 1, kinds
    assert kinds.count("server") >= 2 and kinds.count("client") >= 4 and kinds.count("local") >= 4, kinds
    for old, _ in SHRINK:
        assert any(old in b.text for b in BLOCKS), f"SHRINK rule {old!r} matches no README block"


def test_make_run_is_splitserve_up() -> None:
    out = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ".venv/bin/splitserve up" in out.stdout


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "local"], ids=lambda b: f"line{b.line}")
def test_local_block_runs_as_written(block: Block, workspace: Path) -> None:
    out = run_block(block, workspace, shrunk(block.text))
    if "splitserve plan" in block.text:
        assert "docs/splitwise-facts.md line" in out.stdout  # the paper's figures cite a file the repo ships
        assert (ROOT / "docs" / "splitwise-facts.md").is_file()
        assert (workspace / "out" / "plan.png").read_bytes().startswith(b"\x89PNG")
        assert "kind: SplitserveCluster" in (workspace / "out" / "cluster.yaml").read_text()
    if "--requests-csv out/sim-requests.csv" in block.text:
        assert json.loads((workspace / "out" / "sim.json").read_text())
        assert (workspace / "out" / "sim-requests.csv").stat().st_size > 0


def test_catalog_json_block_and_example_file_load() -> None:
    from cluster.machines import load_catalog

    text = README.read_text()
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    catalog = load_catalog(ROOT / "examples" / "machines.json")
    shipped = json.loads((ROOT / "examples" / "machines.json").read_text())
    assert example["machines"][0] == shipped["machines"][0]
    for entry in shipped["machines"]:
        assert catalog[entry["name"]].cost_per_hour == entry["cost_per_hour"]
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert {"name", "accelerator", "gpus", "cost_per_hour", "rated_power_w", "capped_power_w",
            "idle_power_w"} <= documented  # fmt: skip


def test_up_synopsis_lists_every_flag_of_up_help() -> None:
    synopsis = README.read_text().split("splitserve up [--model DIR]", 1)[1].split("```", 1)[0]
    help_text = subprocess.run(
        [sys.executable, "-m", "ops.cli", "up", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    flags = set(re.findall(r"\[(--[a-z-]+)", help_text)) - {"--help", "--model"}
    missing = sorted(flag for flag in flags if flag not in synopsis)
    assert not missing, f"README's `splitserve up` synopsis lacks {missing}"


# --- clusters --------------------------------------------------------------------------------------------------


class Cluster:
    """One README server block in the background, in its own process group; stopped as Ctrl-C would."""

    def __init__(self, block: Block, cwd: Path, text: str) -> None:
        self.block = block
        self.proc = subprocess.Popen(
            ["bash", "-c", ACTIVATE.text + "exec " + text.strip().split("#", 1)[0].replace("\\\n", " ")],
            cwd=cwd, env=block_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.output: list[str] = []

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("splitserve: serving "):
                return
        raise AssertionError(
            f"README line {self.block.line}: no cluster came up\n{''.join(self.output)[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def clusters() -> Iterator[list[Cluster]]:
    started: list[Cluster] = []
    try:
        yield started
    finally:
        for cluster in reversed(started):
            cluster.stop()


def test_cluster_blocks_run_against_live_clusters(workspace: Path, clusters: list[Cluster]) -> None:
    ports = {address: f"127.0.0.1:{free_port()}" for address in CLUSTER_PORTS}
    flags = {"--http-port 8000": "127.0.0.1:8000", "--grpc-port 50051": "127.0.0.1:50051",
             "--http-port 8001": "127.0.0.1:8001", "--grpc-port 50052": "127.0.0.1:50052"}  # fmt: skip

    def on_test_ports(text: str) -> str:
        for flag, address in flags.items():
            text = text.replace(flag, f"{flag.split()[0]} {ports[address].split(':')[1]}")
        for address, ours in ports.items():
            text = text.replace(address, ours)
        return text

    servers = [b for b in BLOCKS if b.kind == "server"]
    colocated = next(b for b in servers if "--colocated 1" in b.text)
    # `make run` with no UP_ARGS is `splitserve up` (test_make_run_is_splitserve_up) on the README's default ports.
    make_run = Block("sh", "splitserve up --grpc-port 50051 --http-port 8000\n", 0)
    for block in (make_run, colocated):
        clusters.append(Cluster(block, workspace, on_test_ports(block.text)))
    for cluster in clusters:
        cluster.wait_ready()

    grpcurl = shutil.which("grpcurl") is not None
    for block in (b for b in BLOCKS if b.kind == "client"):
        if "grpcurl" in block.text and not grpcurl:
            continue  # not installed here: see the module docstring
        out = run_block(block, workspace, on_test_ports(shrunk(block.text)))
        if "/v1/chat/completions" in block.text and "curl" in block.text:
            assert '"choices"' in out.stdout and out.stdout.rstrip().endswith("data: [DONE]"), out.stdout[
                -2000:
            ]
            chunks = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("data: {")]
            usage = [chunk for chunk in chunks if chunk.get("usage")]
            assert (
                usage and usage[-1]["usage"]["completion_tokens"] <= 16
            )  # max_tokens holds the stream short
        if "--compare" in block.text:
            for run in ("split", "colocated"):
                results = json.loads((workspace / "out" / run / "results.json").read_text())
                assert results_failed(results) == 0, results
            assert "colocated" in out.stdout and "split" in out.stdout, out.stdout  # the runs' labels
    for cluster in reversed(clusters):
        cluster.stop()
    clusters.clear()

    # The placement example prices and powers its nodes by machine type: usage reports energy and cost.
    power = next(b for b in servers if "--policy power" in b.text)
    http = f"127.0.0.1:{free_port()}"
    text = power.text.rstrip() + f" --grpc-port {free_port()} --http-port {http.split(':')[1]}\n"
    clusters.append(Cluster(power, workspace, text))
    clusters[0].wait_ready()
    completion = next(b for b in BLOCKS if b.kind == "client" and "/v1/completions" in b.text)
    first_curl = completion.text.split("\ncurl ", 1)[0].replace("127.0.0.1:8000", http)
    out = run_block(completion, workspace, first_curl)
    usage = json.loads(out.stdout)["usage"]
    assert usage["energy_joules"] > 0 and usage["cost_usd"] > 0, usage


def results_failed(results: object) -> int:
    """The `failed` count of a bench results.json, wherever its summary keeps it."""
    if isinstance(results, dict):
        if "failed" in results and isinstance(results["failed"], int):
            return int(results["failed"])
        for value in results.values():
            found = results_failed(value)
            if found >= 0:
                return found
    return -1
