"""Tracing across processes: router, prefill node and decode node export to one OTLP receiver, and every request
is one trace with spans from all three, each span's parent in the same trace and the router's span at the root.

The receiver is a real OTLP/gRPC TraceService in this test process, keeping what it is sent in memory; the cluster
finds it through OTEL_EXPORTER_OTLP_ENDPOINT, which its processes inherit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cluster.state import ClusterView
from ops.launcher import ClusterSpec, LocalCluster
from tests.integration.cluster_client import generate_many
from tests.integration.test_cluster_failures import MAX_TOKENS, prompts, stream_all_and_kill

pytestmark = pytest.mark.timeout(120)
REQUESTS = 3
SERVICES = {"splitserve-router", "splitserve-prefill", "splitserve-decode"}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes  # b"" for a root
    events: tuple[str, ...]
    attributes: dict[str, str] = field(default_factory=dict)  # the span's string attributes
    event_attributes: tuple[dict[str, str], ...] = ()  # each event's string attributes, in order


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        name = attributes.get("service.name", "")
                        events = tuple(e.name for e in s.events)
                        span = ReceivedSpan(
                            name, s.name, s.trace_id, s.span_id, s.parent_span_id, events,
                            _strings(s.attributes), tuple(_strings(e.attributes) for e in s.events),
                        )  # fmt: skip
                        self.spans.append(span)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Receiver]:
    service = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 100 ms rather than every 5 s
    try:
        yield service
    finally:
        server.stop(grace=None)


def _strings(attributes) -> dict[str, str]:
    return {a.key: a.value.string_value for a in attributes if a.value.HasField("string_value")}


def wait_for_roots(receiver: _Receiver, count: int) -> None:
    """Stopping the cluster flushed every exporter; allow the receiver a bounded moment to store the last batch."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        roots = [s for s in receiver.snapshot() if s.name == "generate" and s.service == "splitserve-router"]
        if len(roots) >= count:
            return
        time.sleep(0.05)


def by_trace(spans: list[ReceivedSpan]) -> dict[bytes, list[ReceivedSpan]]:
    traces: dict[bytes, list[ReceivedSpan]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    return traces


def test_each_request_is_one_trace_across_router_prefill_and_decode(
    llama_dir: Path, receiver: _Receiver
) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       node_args=["--kv-cache-mb", "32"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        prompts = [[5 + i, 17, 29, 31, 40 + i] for i in range(REQUESTS)]
        results = generate_many(cluster.router_address, prompts, max_tokens=4, temperature=0.0)
        assert all(len(r.token_ids) == 4 for r in results)
    wait_for_roots(receiver, REQUESTS)
    traces = by_trace(receiver.snapshot())

    assert len(traces) == REQUESTS  # one trace per request, and nothing outside them
    for spans in traces.values():
        assert {s.service for s in spans} == SERVICES
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if not s.parent_id]
        assert [(r.service, r.name) for r in roots] == [("splitserve-router", "generate")]
        assert all(s.parent_id in ids for s in spans if s.parent_id)  # every parent is in the same trace
        parent_of = {s.span_id: s for s in spans}
        names = {(s.service, s.name): parent_of.get(s.parent_id) for s in spans}
        # Each node's span hangs under the router's span for the RPC that reached it.
        for node_span, rpc in [
            (("splitserve-prefill", "prefill"), "Prefill"),
            (("splitserve-decode", "reserve"), "Reserve"),
            (("splitserve-decode", "decode"), "Decode"),
        ]:
            parent = names[node_span]
            assert parent is not None and (parent.service, parent.name) == ("splitserve-router", rpc)
        for child, parent_name in [("queue", "prefill"), ("compute", "prefill"), ("kv_transfer", "prefill")]:
            parent = names[("splitserve-prefill", child)]
            assert parent is not None and parent.name == parent_name
        decode = names[("splitserve-decode", "generation")]  # the generation's parent
        assert decode is not None and decode.name == "decode"
        assert decode.events == ("kv_arrived", "admitted")
        assert roots[0].events == ("placed",)


def test_a_colocated_fallback_is_an_event_and_the_node_span_joins_the_trace(
    llama_dir: Path, receiver: _Receiver
) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=0, decode=0, colocated=1, grpc_port=0, http_port=0,
                       node_args=["--kv-cache-mb", "32"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        results = generate_many(cluster.router_address, [[5, 17, 29]], max_tokens=3, temperature=0.0)
        assert len(results[0].token_ids) == 3
    wait_for_roots(receiver, 1)
    traces = by_trace(receiver.snapshot())

    assert len(traces) == 1
    (spans,) = traces.values()
    parent_of = {s.span_id: s for s in spans}
    root = next(s for s in spans if not s.parent_id)
    assert (root.service, root.name, root.events) == ("splitserve-router", "generate", ("fallback",))
    node = next(s for s in spans if s.service == "splitserve-colocated")
    call = parent_of[node.parent_id]
    assert (node.name, call.service, call.name, call.parent_id) == ("generate", "splitserve-router", "Generate",
                                                                    root.span_id)  # fmt: skip


def test_an_http_callers_traceparent_becomes_the_parent_of_the_request(
    llama_dir: Path, receiver: _Receiver
) -> None:
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    spec = ClusterSpec(model_dir=llama_dir, prefill=0, decode=0, colocated=1, grpc_port=0, http_port=0,
                       node_args=["--kv-cache-mb", "32"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        request = urllib.request.Request(
            f"http://{cluster.http_address}/v1/completions",
            data=json.dumps({"model": llama_dir.name, "prompt": "hello", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{caller_span}-01"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 2
    wait_for_roots(receiver, 1)
    (root,) = [s for s in receiver.snapshot() if s.name == "generate" and s.service == "splitserve-router"]
    assert (root.trace_id, root.parent_id) == (bytes.fromhex(trace_id), bytes.fromhex(caller_span))


def test_a_decode_node_dying_mid_stream_is_a_retry_event_on_the_requests_it_served(
    llama_dir: Path, receiver: _Receiver
) -> None:
    batch = prompts(6, 40, seed=3)
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=2, grpc_port=0, http_port=0)
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        victim = cluster.by_role("decode")[0]
        results, _, progress, _ = asyncio.run(
            stream_all_and_kill(cluster, view, batch, victim, after_tokens=5)
        )
        assert min(progress) < MAX_TOKENS, "every stream finished before the kill: the test proved nothing"
        assert all(r and len(r.token_ids) == MAX_TOKENS for r in results)
    wait_for_roots(receiver, len(batch))
    roots = [s for s in receiver.snapshot() if s.name == "generate" and s.service == "splitserve-router"]
    assert len(roots) == len(batch)
    on_victim = [r for r in roots if r.attributes["splitserve.decode_node"] == victim.node_id]
    assert on_victim, "no request was placed on the node that was killed"
    for root in roots:
        if root in on_victim:
            # Placed on the victim, retried when it died, placed again on the survivor.
            assert root.events == ("placed", "retry", "placed")
            retry = root.event_attributes[1]
            assert (
                retry["splitserve.node_id"] == victim.node_id and "mid-stream" in retry["splitserve.reason"]
            )
            assert root.event_attributes[2]["splitserve.decode_node"] != victim.node_id
        else:
            assert root.events == ("placed",)
