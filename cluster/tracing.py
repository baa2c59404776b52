"""OpenTelemetry tracing for router and nodes: one trace per request, carried across processes in gRPC metadata.

Off by default: with no endpoint (`--otlp-endpoint` or the standard OTEL_EXPORTER_OTLP_ENDPOINT) every span is
the API's no-op span and no `traceparent` is sent, so the cost is a few attribute look-ups per request.
When on, each process has its own TracerProvider (service.name `splitserve-<role>`, with its node id and machine
type) exporting in batches over OTLP/gRPC; the router starts a request's root span and hands its context to the
nodes as a W3C `traceparent` in the metadata of each RPC, so their spans join the same trace.

Spans are started with an explicit parent and never made "current": the services are async generators whose
bodies resume on whatever task iterates them, where a context attached at one `yield` cannot be detached safely.
This module imports no torch (the router uses it); the engine does not use it at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTRUMENTATION = "splitserve"
# gRPC metadata: a sequence of (key, value) pairs with lowercase keys; W3C's header names already are.
Metadata = tuple[tuple[str, str], ...]

INVALID_SPAN: Span = trace.INVALID_SPAN  # the no-op span: a placeholder before a real one starts
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_OP = trace.NoOpTracer()
_provider: TracerProvider | None = None


def endpoint_from(flag: str | None) -> str | None:
    """The OTLP endpoint to export to: the flag, else the standard environment variables; None: tracing off.

    ValueError for an endpoint without http:// or https:// (the exporter would otherwise guess TLS silently)."""
    endpoint = flag or next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
    if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
        raise ValueError(f"OTLP endpoint {endpoint!r} must start with http:// (plain gRPC) or https:// (TLS)")
    return endpoint


def configure(
    role: str,
    endpoint: str | None,
    attributes: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Turn tracing on for this process when an endpoint (or, in tests, an exporter) is given; True if on.

    role: router, prefill, decode or colocated (service.name is splitserve-<role>). Call once, before serving."""
    global _provider
    if endpoint is None and exporter is None:
        return False
    resource = Resource.create(
        {"service.name": f"splitserve-{role}", "splitserve.role": role, **(attributes or {})}
    )
    provider = TracerProvider(resource=resource)
    if exporter is not None:  # tests: hand each span over at once
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        # Imported only when on: the exporter pulls in generated protobuf modules that an untraced process never needs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if _provider is not None:
        _provider.shutdown()
    _provider = provider
    return True


def shutdown() -> None:
    """Export what is still buffered and turn tracing off (bounded by the exporter's own timeouts)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    return _provider is not None


def tracer() -> Tracer:
    """This process's tracer: the configured provider's, or the no-op one when tracing is off."""
    return _provider.get_tracer(INSTRUMENTATION) if _provider is not None else _NO_OP


def start_span(
    name: str,
    parent: Span | Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    start_time_ns: int | None = None,
) -> Span:
    """A span under `parent` (a span, a context from incoming metadata, or None for a new trace); end it yourself,
    or use it as a context manager (which records an escaping exception), without making it current."""
    context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    return tracer().start_span(name, context=context, attributes=attributes, start_time=start_time_ns)


def metadata_for(span: Span) -> Metadata | None:
    """gRPC metadata carrying `span` as the parent of the callee's spans; None when the span records nothing."""
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def context_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Context | None:
    """The caller's trace context from incoming gRPC metadata (`context.invocation_metadata()`); None if absent
    or tracing is off here."""
    if _provider is None or not metadata:
        return None
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def caller_context(grpc_context: Any) -> Context | None:
    """The trace context a gRPC caller sent (a servicer's `context`); None when it sent none or tracing is off."""
    if _provider is None:  # skip reading the metadata: the common case must cost next to nothing
        return None
    return context_from_metadata(grpc_context.invocation_metadata())


def span_from_grpc(name: str, grpc_context: Any, attributes: Mapping[str, Any] | None = None) -> Span:
    """A server-side span: the child of the caller's span when its metadata carries one."""
    if _provider is None:
        return INVALID_SPAN
    return start_span(name, caller_context(grpc_context), attributes)


def mark_failed(span: Span, reason: str) -> None:
    """Flag a span as failed for a reason caught and handled in its body (no exception escapes to record)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, reason))
