"""W3C trace context across Kafka headers, gRPC metadata and HTTP, via OpenTelemetry.

Export is set by the standard ``OTEL_*`` variables, as every OpenTelemetry SDK reads them:

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` turn OTLP export on;
  ``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``..._TRACES_PROTOCOL`` pick ``grpc`` or ``http/protobuf``
  (the spec's default); headers, timeout, compression and certificates come from their
  ``OTEL_EXPORTER_OTLP_*`` variables, read by the exporter itself.
* ``OTEL_TRACES_EXPORTER``: ``otlp`` (default when an endpoint is set), ``console`` or ``none``.
* ``OTEL_SERVICE_NAME`` (default ``aios-<service>``), ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER``/``_ARG`` and ``OTEL_BSP_*`` as the SDK defines them;
  ``OTEL_SDK_DISABLED=true`` records nothing.
* ``AIOS_OTLP_ENDPOINT`` (the older mesh setting) still means OTLP/gRPC to that endpoint
  when no ``OTEL_EXPORTER_OTLP_*`` endpoint is set.

Without an endpoint, spans are not recorded (``RecordWhenExported``): they keep valid ids, so
headers, child services and log lines still carry the trace, but no span is built for nobody to
read. A processor added later (a test's capture) turns recording on. The gRPC channels and
servers of ``grpc_server`` are instrumented with the OpenTelemetry gRPC instrumentation, and every httpx client with the
httpx instrumentation, whose hook adds the GenAI attributes to model calls (``genai``)."""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import TraceState

__all__ = ["configure_tracing", "current_span_id", "current_trace_id", "extract", "genai_attributes",
           "genai_request_hook", "in_context_of", "in_current_context", "inject", "links_to", "span_from_headers",
           "new_provider", "RecordWhenExported", "start_span", "tracer"]

_configured = False
T = TypeVar("T")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _exporter_processor(fallback_endpoint: str) -> SpanProcessor | None:
    """The span processor the OTEL_* variables ask for, or None (traces stay in-process)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    kind = (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",")[0].strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter())
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and not fallback_endpoint:
        return None
    protocol = (_env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
                or ("http/protobuf" if endpoint else "grpc"))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # The exporter reads its endpoint, headers, TLS and timeout from OTEL_* itself.
        exporter: Any = GrpcExporter() if endpoint else GrpcExporter(endpoint=fallback_endpoint, insecure=True)
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use grpc or http/protobuf")
    return BatchSpanProcessor(exporter)


class RecordWhenExported(Sampler):
    """Samples with ``inner`` once the provider has a span processor, and drops (ids kept, nothing
    recorded) until then. Profiles of the closed loop put span bookkeeping at 10-20% of each
    service's CPU with nothing exporting it.

    ``inner`` is the sampler ``OTEL_TRACES_SAMPLER`` names, else the SDK's default (parent-based,
    always on): a caller that sampled a trace out is followed. A span dropped here only because
    nothing exports it is marked in its tracestate (``aios=unrecorded``), and a service that does
    export treats such a parent as a root: a service without a collector must not switch tracing
    off for the services after it that have one."""

    def __init__(self, inner: Sampler | None = None) -> None:
        from opentelemetry.sdk.trace.sampling import DEFAULT_ON

        self.inner = inner or DEFAULT_ON
        self.exported = False

    def should_sample(self, parent_context: otel_context.Context | None, trace_id: int, name: str,
                      kind: trace.SpanKind | None = None, attributes: Any = None,
                      links: Any = None, trace_state: Any = None) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not self.exported:
            state = parent.trace_state if parent.is_valid else TraceState()
            key, value = _UNRECORDED
            return SamplingResult(Decision.DROP, None,
                                  state.update(key, value) if key in state else state.add(key, value))
        unexported = parent.is_valid and not parent.trace_flags.sampled and \
            parent.trace_state.get(_UNRECORDED[0]) == _UNRECORDED[1]
        if unexported:
            parent_context = None  # dropped for want of an exporter, not by choice: decide as a root
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"RecordWhenExported{{{self.inner.get_description()}}}"


_UNRECORDED = ("aios", "unrecorded")  # tracestate entry of a span dropped only because nothing exports


class _Provider(TracerProvider):
    """A tracer provider whose sampler hears when a span processor is added."""

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        if isinstance(self.sampler, RecordWhenExported):
            self.sampler.exported = True


def new_provider(resource: Resource | None = None) -> TracerProvider:
    """A tracer provider that records spans only while a processor is there to take them."""
    provider = _Provider(resource=resource) if resource is not None else _Provider()
    # Wraps the SDK's sampler (from OTEL_TRACES_SAMPLER), before any tracer copies it.
    provider.sampler = RecordWhenExported(provider.sampler)
    return provider


def configure_tracing(service: str, otlp_endpoint: str = "") -> None:
    """Install the process's tracer provider (idempotent) and instrument httpx clients."""
    global _configured
    if _configured:
        return
    _configured = True
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return
    # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME are merged in by Resource.create.
    resource = Resource.create({SERVICE_NAME: _env("OTEL_SERVICE_NAME") or f"aios-{service}",
                                "service.namespace": "aios-mesh"})
    provider = new_provider(resource)
    processor = _exporter_processor(otlp_endpoint)
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _instrument_httpx()


def _instrument_httpx() -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(request_hook=genai_request_hook)


_tracer: tuple[object, trace.Tracer] | None = None  # (the provider it came from, the tracer)


def tracer() -> trace.Tracer:
    """The mesh's tracer, made once per tracer provider: the SDK's get_tracer builds a new tracer and
    instrumentation scope on every call, and spans are started per record."""
    global _tracer
    provider = trace.get_tracer_provider()
    cached = _tracer
    if cached is None or cached[0] is not provider:
        cached = _tracer = (provider, provider.get_tracer("aiosmesh"))
    return cached[1]


def inject(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """A trace context (default: the current one) as W3C headers (traceparent, tracestate, baggage).
    A handler that decides for many runs at once passes each run's context, e.g. ``extract`` of the
    record that caused the decision, or one it stored with the run."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context W3C headers carry (an empty context when they carry none)."""
    return propagate.extract(dict(headers))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_span_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else ""


@contextmanager
def span_from_headers(name: str, headers: Mapping[str, str], *, kind: trace.SpanKind = trace.SpanKind.CONSUMER,
                      links: Iterable[trace.Link] = (), **attributes: str) -> Iterator[str]:
    """A span that continues the trace the headers carry (or starts one), current inside the
    block; yields its trace id. Use one per record: a batch span continues only one trace (link
    the others' with ``links_to``)."""
    token = otel_context.attach(extract(headers))
    try:
        with tracer().start_as_current_span(name, kind=kind, attributes=attributes, links=list(links)):
            yield current_trace_id()
    finally:
        otel_context.detach(token)


def start_span(name: str, headers: Mapping[str, str], *, kind: trace.SpanKind = trace.SpanKind.CONSUMER,
               links: Iterable[trace.Link] = (), attributes: Mapping[str, Any] | None = None) -> trace.Span:
    """A span continuing the trace the headers carry, not made current: for a handler that works on
    many records at once and gives each its own span over the same work (the caller ends them)."""
    return tracer().start_span(name, context=extract(headers), kind=kind, attributes=dict(attributes or {}),
                               links=list(links))


_MAX_LINKS = 128  # the SDK's default span link limit


def links_to(carriers: Iterable[Mapping[str, str]], *, also: trace.Span | None = None) -> list[trace.Link]:
    """Links to the distinct traces these W3C carriers name (and to ``also``), at most 128: how a
    span over a batch names the other traces it served, whose parent it cannot be."""
    seen: set[tuple[int, int]] = set()
    out: list[trace.Link] = []
    contexts = [trace.get_current_span(extract(c)).get_span_context() for c in carriers]
    if also is not None:
        contexts.insert(0, also.get_span_context())
    for ctx in contexts:
        if ctx.is_valid and (ctx.trace_id, ctx.span_id) not in seen and len(out) < _MAX_LINKS:
            seen.add((ctx.trace_id, ctx.span_id))
            out.append(trace.Link(ctx))
    return out


@contextmanager
def in_context_of(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the trace the headers carry current without a span of its own, so the calls inside
    (a gRPC client span, a produced record) join that trace rather than the batch's."""
    token = otel_context.attach(extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


def in_current_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` bound to the caller's context (trace context and log context), for a thread pool:
    a worker thread does not inherit context variables, so without this its spans and records
    start new traces and its log lines lose the run id."""
    ctx = contextvars.copy_context()

    def bound(*args: Any, **kwargs: Any) -> T:
        return ctx.copy().run(fn, *args, **kwargs)  # a copy per call: one Context cannot run in two threads

    return bound


# -- GenAI semantic conventions on model calls ---------------------------------------------
# The inference service's HTTP API and OpenAI-compatible chat endpoints, recognised by path.
_INFERENCE_OPS = {"/v1/classify": ("classify", "intent-classifier"), "/v1/embed": ("embeddings", "embedder")}
_TIERS = {"interactive": "low_latency", "bulk": "high_throughput"}
_MAX_BODY = 1 << 20


def _request_json(request: Any) -> dict[str, Any]:
    import httpx

    stream = getattr(request, "stream", None)
    if not isinstance(stream, httpx.ByteStream):
        return {}
    body = b"".join(stream)  # a ByteStream holds the whole body and can be read again
    if not body or len(body) > _MAX_BODY:
        return {}
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def genai_attributes(path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The GenAI attributes of a model call to ``path`` with this JSON body (empty if not one)."""
    if path in _INFERENCE_OPS:
        operation, model = _INFERENCE_OPS[path]
        texts = body.get("texts")
        latency_class = str(body.get("latency_class") or "interactive")
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "aios.inference",
                                 "gen_ai.request.model": model, "aios.inference.latency_class": latency_class,
                                 "aios.inference.tier": _TIERS.get(latency_class, "unknown")}
        if isinstance(texts, list):
            attrs["aios.inference.texts"] = len(texts)  # the request's batch; Serve may batch further
        return attrs
    if path.endswith("/chat/completions"):
        attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                 "gen_ai.request.model": str(body.get("model") or "unknown")}
        for key in ("max_tokens", "temperature", "top_p"):
            if isinstance(body.get(key), int | float):
                attrs[f"gen_ai.request.{key}"] = body[key]
        return attrs
    return {}


def genai_request_hook(span: Any, request: Any) -> None:
    """httpx instrumentation hook: name and annotate model-call spans by the GenAI conventions.
    Response attributes (tokens, response model) are the callee's to set on its own span."""
    if span is None or not span.is_recording():
        return
    path = str(getattr(getattr(request, "url", None), "path", "") or "")
    if path not in _INFERENCE_OPS and not path.endswith("/chat/completions"):
        return
    attrs = genai_attributes(path, _request_json(request))
    if attrs:
        span.update_name(f"{attrs['gen_ai.operation.name']} {attrs['gen_ai.request.model']}")
        span.set_attributes(attrs)
