"""Spans of the inference service, by the OpenTelemetry GenAI conventions.

Two kinds, in two kinds of process (each Serve replica sets up its own tracing from the
``OTEL_*`` variables it inherits from the raylet, as every mesh service does):

- the router's server span per HTTP request (``classify intent-classifier``), continuing the
  caller's ``traceparent`` (the caller's httpx client span);
- a tier replica's ``infer <tier>`` span per caller's call, parented to the router span that
  made the call (its context travels as an argument of the Serve call, which carries no
  trace context of its own). One model call packs the texts of many calls, of many runs:
  each call's span covers that model call and says how big it was (``aios.inference.batch_size``
  texts from ``aios.inference.batch_requests`` calls), so every run's trace shows its model call
  and the batch it rode in.

Ray-free (OpenTelemetry only), so unit tests drive it without a cluster."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from services.common import tracing
from services.inference.model import CLASSIFIER_NAME, EMBEDDER_NAME

__all__ = ["GENAI_OPERATIONS", "call_context", "describe", "model_call_spans", "request_span", "response_model"]

# op (the router's route) -> (gen_ai.operation.name, gen_ai.request.model), as the client names them
GENAI_OPERATIONS = {"classify": ("classify", "intent-classifier"), "embed": ("embeddings", "embedder")}
PROVIDER = "aios.inference"


def _base(op: str, tier: str, latency_class: str, texts: int) -> dict[str, Any]:
    operation, model = GENAI_OPERATIONS[op]
    return {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model,
            "aios.inference.tier": tier, "aios.inference.latency_class": latency_class,
            "aios.inference.texts": texts}


@contextmanager
def request_span(op: str, headers: Mapping[str, str]) -> Iterator[trace.Span]:
    """The router's span of one request, current inside the block; the caller adds what it learns
    (``describe``) once the body is parsed. Where Serve's own HTTP instrumentation already opened
    a server span for the request (it continued the caller's trace), this one is its child."""
    operation, model = GENAI_OPERATIONS[op]
    served = trace.get_current_span().get_span_context().is_valid
    with tracing.span_from_headers(f"{operation} {model}", tracing.inject() if served else headers,
                                   kind=trace.SpanKind.INTERNAL if served else trace.SpanKind.SERVER,
                                   **{"http.route": f"/v1/{op}", "gen_ai.operation.name": operation,
                                      "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model}):
        yield trace.get_current_span()


def describe(span: trace.Span, op: str, tier: str, latency_class: str, texts: int, *,
             response_model: str = "", computed: int | None = None) -> None:
    """Add the request's GenAI attributes: tier, texts, the model that answered, and for an embed
    how many texts the model computed (the rest came from the router's cache)."""
    attrs = _base(op, tier, latency_class, texts)
    if response_model:
        attrs["gen_ai.response.model"] = response_model
    if computed is not None:
        attrs["aios.inference.texts_computed"] = computed
    span.set_attributes(attrs)


def model_call_spans(tier: str, calls: Sequence[Sequence[str]], contexts: Sequence[Mapping[str, str]],
                     results: Sequence[Mapping[str, Any]], start_ns: int, end_ns: int) -> None:
    """One finished span per call of a Serve batch, each in its caller's trace, covering the model
    call that computed it. ``results`` are the model's (``batch_texts``/``batch_requests``: the size
    of the model call, which may have merged several Serve batches)."""
    for texts, carrier, result in zip(calls, contexts, results, strict=False):
        operation = str(carrier.get("aios-operation") or "classify")
        attrs = _base(operation if operation in GENAI_OPERATIONS else "classify", tier, "", len(texts))
        attrs.pop("aios.inference.latency_class")
        attrs.update({"aios.inference.batch_size": int(result.get("batch_texts", len(texts))),
                      "aios.inference.batch_requests": int(result.get("batch_requests", 1)),
                      "aios.inference.serve_batch_calls": len(calls),
                      "aios.inference.queue_ms": float(result.get("queue_ms", 0.0)),
                      "aios.inference.model_ms": float(result.get("model_ms", 0.0))})
        attrs["gen_ai.response.model"] = response_model(operation, str(result.get("version") or ""))
        span = tracing.tracer().start_span(f"infer {tier}", context=tracing.extract(carrier),
                                           kind=trace.SpanKind.INTERNAL, attributes=attrs, start_time=start_ns)
        span.end(end_time=end_ns)


def response_model(op: str, version: str) -> str:
    """The model that answered: the classifier at its version, or the embedder."""
    return EMBEDDER_NAME if op == "embed" else f"{CLASSIFIER_NAME}@{version}" if version else CLASSIFIER_NAME


def call_context(op: str) -> dict[str, str]:
    """What a router's call to a tier carries: the current trace context and the operation."""
    return {**tracing.inject(), "aios-operation": op}
