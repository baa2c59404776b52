"""The ops dashboard of a live split cluster: its JSON API, its API-key check, and the page in a real Chromium.

The cluster: embedded Redis, a router with an API key, 1 prefill, 2 decode and 1 colocated node. The browser test
drives Debian's chromium (installed by `make test`) through Playwright with its executable path: Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cluster.state import connect, read_control
from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(180)
API_KEY = "dashboard-test-key"
WAIT_S = 30.0
LAYER_WISE_PROMPT = 600  # past the prefill node's --one-piece-below (512): its KV streams layer by layer


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=1,
        decode=2,
        colocated=1,
        grpc_port=0,
        http_port=0,
        api_key=API_KEY,
        role_args={"decode": ["--machine-type", "dgx-h100-cap"], "prefill": ["--machine-type", "dgx-h100"]},
    )
    with LocalCluster(spec) as running:
        yield running


def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key=API_KEY, max_retries=0, timeout=60
    )


def prompt(length: int) -> list[int]:
    return [3 + i % 500 for i in range(length)]


def call(
    cluster: LocalCluster, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{cluster.http_address}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def state(cluster: LocalCluster) -> dict[str, Any]:
    status, body = call(cluster, "GET", "/dashboard/api/state")
    assert status == 200
    return body


def node_ids(cluster: LocalCluster) -> set[str]:
    return {p.node_id for role in ("prefill", "decode", "colocated") for p in cluster.by_role(role)}


def wait_until(predicate, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def test_state_shows_every_node_and_a_request_split_by_phase(cluster: LocalCluster, llama_dir: Path) -> None:
    reply = client(cluster).completions.create(
        model=llama_dir.name, prompt=prompt(LAYER_WISE_PROMPT), max_tokens=6, extra_body={"ignore_eos": True}
    )
    snap = state(cluster)
    assert {n["node_id"] for n in snap["nodes"]} == node_ids(cluster)
    pools = {n["node_id"]: n["pool"] for n in snap["nodes"]}
    assert sorted(pools.values()) == ["colocated", "decode", "decode", "prefill"]
    assert snap["cluster"]["cost_per_hour"] == pytest.approx(sum(n["cost_per_hour"] for n in snap["nodes"]))
    assert snap["cluster"]["cost_per_hour"] > 0 and snap["cluster"]["rated_power_w"] > 0
    assert all(n["health"] == "ok" and n["power_source"] == "modeled" for n in snap["nodes"])

    recent = snap["requests"]["recent"][0]
    status, record = call(cluster, "GET", f"/dashboard/api/requests/{recent['request_id']}")
    assert status == 200 and record["outcome"] == "ok" and record["route"] == "pair"
    assert record["prompt_tokens"] == LAYER_WISE_PROMPT and record["output_tokens"] == 6
    usage = reply.model_dump()["usage"]  # splitserve's extra usage fields ride along in the JSON
    assert record["energy_joules"] == pytest.approx(usage["energy_joules"]) and usage["energy_joules"] > 0
    phases = record["phases"]
    assert phases["prefill"] > 0 and phases["decode"] > 0 and phases["queue"] >= 0
    # The phases follow each other: together they are the request's whole time at the router.
    assert 0.5 * record["e2e_s"] <= sum(phases.values()) <= record["e2e_s"] + 1e-3
    # Every prompt token's K and V, in every layer, crossed to the decode node (the model's config says how big).
    config = json.loads((llama_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # float32 KV
    assert record["transfer_bytes"] >= LAYER_WISE_PROMPT * per_token
    assert record["transfer_seconds"] > 0
    assert call(cluster, "GET", "/dashboard/api/requests/no-such-request")[0] == 404

    # The same prompt again: its prefill node holds it now, and its card's prefix-cache hit rate says so.
    client(cluster).completions.create(
        model=llama_dir.name, prompt=prompt(LAYER_WISE_PROMPT), max_tokens=2, extra_body={"ignore_eos": True}
    )
    deadline = time.monotonic() + 10
    while not any((n["prefix_hit_rate"] or 0) > 0 for n in state(cluster)["nodes"] if n["pool"] == "prefill"):
        assert time.monotonic() < deadline, "no prefill node reports a prefix-cache hit"
        time.sleep(0.05)


def test_actions_need_the_api_key(cluster: LocalCluster) -> None:
    decode = cluster.by_role("decode")[0].node_id
    path = f"/dashboard/api/nodes/{decode}/drain"
    assert call(cluster, "POST", path, {"drain": True})[0] == 401
    status, body = call(cluster, "POST", path, {"drain": True}, key="wrong-key")
    assert status == 401 and "API key" in body["error"]["message"]
    assert call(cluster, "POST", f"/dashboard/api/nodes/{decode}/move", {"pool": "prefill"})[0] == 401
    redis_client = connect(cluster.redis_url)
    try:
        assert read_control(redis_client, decode) is None  # nothing was written for the refused actions
    finally:
        redis_client.close()
    # With the key, bad actions are refused with a reason and nothing breaks.
    assert (
        call(cluster, "POST", "/dashboard/api/nodes/no-such-node/drain", {"drain": True}, API_KEY)[0] == 404
    )
    assert call(cluster, "POST", path, {"drain": "yes"}, API_KEY)[0] == 400
    assert call(cluster, "POST", path, b"{not json", API_KEY)[0] == 400
    move = f"/dashboard/api/nodes/{decode}/move"
    assert call(cluster, "POST", move, {"pool": "gpu"}, API_KEY)[0] == 400
    assert call(cluster, "POST", move, {"pool": "decode"}, API_KEY)[0] == 409
    # Reads stay open, like /metrics.
    assert call(cluster, "GET", "/dashboard/api/state")[0] == 200


class Load:
    """Requests sent one after another over HTTP until stopped (at most `limit`), so the page has numbers to move."""

    def __init__(self, cluster: LocalCluster, model: str, limit: int = 2000) -> None:
        self.client = client(cluster)
        self.model = model
        self.limit = limit
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < self.limit:
            length = LAYER_WISE_PROMPT if self.sent % 5 == 0 else 40
            try:
                self.client.completions.create(
                    model=self.model, prompt=prompt(length), max_tokens=8, extra_body={"ignore_eos": True}
                )
            except openai.OpenAIError as exc:
                self.errors.append(str(exc))
            self.sent += 1


def test_dashboard_in_chromium(cluster: LocalCluster, llama_dir: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)"
    console_errors: list[str] = []
    screenshot = tmp_path / "dashboard.png"
    drained = cluster.by_role("decode")[0].node_id
    with sync_api.sync_playwright() as playwright, Load(cluster, llama_dir.name) as load:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: console_errors.append(f"page error: {exc}"))
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(f"http://{cluster.http_address}/dashboard")

            # Every node of the cluster is on the map, in its pool.
            for role in ("prefill", "decode", "colocated"):
                for proc in cluster.by_role(role):
                    page.locator(f'.pool[data-pool="{role}"] [data-node-id="{proc.node_id}"]').wait_for()
            assert page.locator("[data-node-id]").count() == len(node_ids(cluster))
            page.wait_for_function("document.getElementById('connection').textContent === 'live'")

            # The numbers move while the load runs.
            served = page.locator("#stat-finished")
            first = int(served.inner_text().replace(",", "") or 0)
            page.wait_for_function(
                f"Number(document.getElementById('stat-finished').textContent.replace(/,/g, '')) > {first + 3}"
            )
            page.wait_for_function("document.querySelector('#requests tbody tr') !== null")

            # A request's trace: pick the newest one, its phases show up in milliseconds.
            page.locator("#requests tbody tr").first.click()
            page.locator('#trace [data-phase="decode"]').wait_for()
            assert page.locator("#trace .stack > div").count() == 5

            # Drain a decode node with the API key: the card turns draining/drained, the router's state agrees.
            page.fill("#api-key", API_KEY)
            card = page.locator(f'[data-node-id="{drained}"]')
            card.locator("button.drain").click()
            page.wait_for_function(
                f"""['draining', 'drained'].includes(
                    document.querySelector('[data-node-id="{drained}"]').dataset.health)"""
            )
            assert card.locator("button.drain").inner_text() == "Resume"
            wait_until(
                lambda: _health(cluster, drained) in ("draining", "drained"), "the router to see the drain"
            )
            page.screenshot(path=str(screenshot), full_page=True)

            # Resume it, from the page too.
            card.locator("button.drain").click()
            page.wait_for_function(
                f"document.querySelector('[data-node-id=\"{drained}\"]').dataset.health === 'ok'"
            )
        finally:
            browser.close()
    assert load.sent > 3 and not load.errors, load.errors[:3]
    assert console_errors == [], console_errors
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("SPLITSERVE_TEST_ARTIFACTS")  # where CI or a developer wants the screenshot kept
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "dashboard.png")


def _health(cluster: LocalCluster, node_id: str) -> str:
    return next(n["health"] for n in state(cluster)["nodes"] if n["node_id"] == node_id)


def test_moving_a_node_through_the_dashboard_api(cluster: LocalCluster, llama_dir: Path) -> None:
    """Last in this module: it changes the cluster. The colocated node becomes a decode node (same process)."""
    (colocated,) = cluster.by_role("colocated")
    status, body = call(
        cluster, "POST", f"/dashboard/api/nodes/{colocated.node_id}/move", {"pool": "decode"}, API_KEY
    )
    assert status == 200 and body["pool"] == "decode"
    before = node_ids(cluster)

    def moved() -> bool:
        nodes = state(cluster)["nodes"]
        pools = [n["pool"] for n in nodes]
        return pools.count("decode") == 3 and "colocated" not in pools

    wait_until(moved, "the colocated node to come back as a decode node", timeout_s=60)
    newcomer = next(n for n in state(cluster)["nodes"] if n["node_id"] not in before)
    assert newcomer["pool"] == "decode" and newcomer["health"] == "ok"
    assert colocated.popen.poll() is None  # the same OS process, restarted in its new role
    # The launcher (what `splitserve up` prints from) follows it: a `moving` event, then its new ready line.
    kinds: list[object] = []

    def came_back() -> bool:
        kinds.extend(event["event"] for proc, event in cluster.poll_events() if proc is colocated)
        return "ready" in kinds

    wait_until(came_back, "the moved node's new ready line")
    assert "moving" in kinds and kinds.index("moving") < kinds.index("ready")
    assert colocated.role == "decode" and colocated.node_id == newcomer["node_id"]
    reply = client(cluster).completions.create(
        model=llama_dir.name, prompt=prompt(30), max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4
