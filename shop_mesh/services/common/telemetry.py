"""OpenTelemetry tracing: a tracer provider always (so logs carry trace ids), OTLP export when configured."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

_configured = False


def configure_tracing(service: str, otlp_endpoint: str | None) -> None:
    """Install the process-wide tracer provider once (tests start several services in one process)."""
    global _configured
    if _configured:
        return
    resource = Resource.create({"service.name": f"shop-{service}"})
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, default parent/on
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    else:
        # Nothing would export the spans: record only where a caller's traceparent asks for it (so
        # its sampled flag travels on); otherwise spans are non-recording, which still carry trace
        # ids for the log lines, at a quarter of the cost (~10 instead of ~45 µs per RPC).
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
    trace.set_tracer_provider(provider)
    _configured = True
