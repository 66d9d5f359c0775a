"""Spans this test process finishes, kept in memory: what the tracing tests read back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tracing


@contextmanager
def finished_spans(service: str) -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes from now on, on the global provider. The provider is set here
    (as ``service``) only if no service or earlier test set it: one process has one global provider."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        tracing.configure_tracing(service)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()
