"""cluster/tracing.py in one process: off by default (the no-op tracer, nothing sent or exported), and when on, a span
carried through gRPC metadata becomes the parent of the receiving side's span."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cluster import tracing
from ops.cli import main


@pytest.fixture(autouse=True)
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in tracing.ENDPOINT_ENVS:
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown()
    yield
    tracing.shutdown()


class _MetadataNeverRead:
    """A servicer context whose metadata must not be read while tracing is off (that is the cost we avoid)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        raise AssertionError("metadata read with tracing off")


def test_off_by_default_the_tracer_is_the_no_op_one_and_nothing_is_sent() -> None:
    assert tracing.endpoint_from(None) is None
    assert not tracing.configure("router", None)
    assert not tracing.enabled()
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    span = tracing.start_span("generate", attributes={"splitserve.request_id": "r1"})
    assert not span.is_recording()
    assert tracing.metadata_for(span) is None  # no traceparent goes to the nodes
    assert tracing.span_from_grpc("prefill", _MetadataNeverRead()) is tracing.INVALID_SPAN
    traceparent = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
    assert tracing.context_from_metadata(traceparent) is None


def test_after_shutdown_nothing_more_is_exported() -> None:
    exporter = InMemorySpanExporter()
    assert tracing.configure("decode", None, exporter=exporter)
    tracing.start_span("reserve").end()
    tracing.shutdown()
    tracing.start_span("decode").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["reserve"]


def test_a_span_sent_in_metadata_parents_the_receivers_span() -> None:
    exporter = InMemorySpanExporter()
    attributes = {"splitserve.node_id": "prefill-1", "splitserve.machine_type": "dgx-h100"}
    assert tracing.configure("prefill", None, attributes, exporter=exporter)
    root = tracing.start_span("generate")
    call = tracing.start_span("Prefill", root)
    metadata = tracing.metadata_for(call)
    assert metadata is not None and [key for key, _ in metadata] == ["traceparent"]  # lowercase, W3C
    served = tracing.start_span("prefill", tracing.context_from_metadata(metadata))
    for span in (served, call, root):
        span.end()

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {s.context.trace_id for s in spans.values()} == {root.get_span_context().trace_id}
    assert spans["generate"].parent is None
    assert spans["Prefill"].parent is not None
    assert spans["Prefill"].parent.span_id == spans["generate"].context.span_id
    assert spans["prefill"].parent is not None and spans["prefill"].parent.is_remote
    assert spans["prefill"].parent.span_id == spans["Prefill"].context.span_id
    resource = spans["prefill"].resource.attributes
    assert resource["service.name"] == "splitserve-prefill"
    assert resource["splitserve.node_id"] == "prefill-1"
    assert resource["splitserve.machine_type"] == "dgx-h100"


def test_the_endpoint_comes_from_the_flag_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.endpoint_from(None) == "http://collector:4317"
    assert tracing.endpoint_from("https://other:4317") == "https://other:4317"
    with pytest.raises(ValueError, match="must start with http://"):
        tracing.endpoint_from("collector:4317")


def test_the_cli_rejects_an_endpoint_without_a_scheme_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["router", "--model", "unused", "--redis-url", "redis://127.0.0.1:1", "--otlp-endpoint", "c:4317"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitserve router: error: OTLP endpoint 'c:4317'") and err.count("\n") == 1
