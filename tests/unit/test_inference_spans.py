"""A Serve batch packs many callers' texts into one model call: each caller's call still gets a
span in its own trace (the router span that made it), saying how big the model call was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.inference import spans as inference_spans
from tests.span_capture import finished_spans

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with finished_spans("inference-spans-test") as exporter:
        yield exporter


def test_each_call_of_a_model_batch_gets_a_span_in_its_callers_trace(spans: InMemorySpanExporter) -> None:
    callers = {0xE1: 0xF1, 0xE2: 0xF2}
    contexts = [{"traceparent": f"00-{t:032x}-{s:016x}-01", "aios-operation": op}
                for (t, s), op in zip(callers.items(), ("classify", "embed"), strict=True)]
    calls = [["a", "b"], ["c"]]
    results = [{"version": "v7", "batch_texts": 5, "batch_requests": 3, "queue_ms": 1.5, "model_ms": 20.0}] * 2
    inference_spans.model_call_spans("high_throughput", calls, contexts, results, 1_000, 2_000)
    made = {s.context.trace_id: s for s in spans.get_finished_spans() if s.name == "infer high_throughput"}
    assert set(made) >= set(callers)
    for (trace_id, parent), texts, op in zip(callers.items(), (2, 1), ("classify", "embeddings"), strict=True):
        span = made[trace_id]
        assert span.parent is not None and span.parent.span_id == parent
        assert (span.start_time, span.end_time) == (1_000, 2_000)
        attrs = dict(span.attributes or {})
        assert {k: attrs[k] for k in ("gen_ai.operation.name", "aios.inference.tier", "aios.inference.texts",
                                      "aios.inference.batch_size", "aios.inference.batch_requests")} == {
            "gen_ai.operation.name": op, "aios.inference.tier": "high_throughput", "aios.inference.texts": texts,
            "aios.inference.batch_size": 5, "aios.inference.batch_requests": 3}
    assert dict(made[0xE1].attributes or {})["gen_ai.response.model"] == "intent-minilm-lr@v7"


def test_the_router_span_continues_the_callers_http_trace(spans: InMemorySpanExporter) -> None:
    headers = {"traceparent": f"00-{0xE3:032x}-{0xF3:016x}-01"}
    with inference_spans.request_span("embed", headers) as span:
        inference_spans.describe(span, "embed", "low_latency", "interactive", 3, response_model="all-MiniLM-L6-v2",
                                 computed=1)
        carried = inference_spans.call_context("embed")
    [made] = [s for s in spans.get_finished_spans() if s.context.trace_id == 0xE3]
    assert made.name == "embeddings embedder" and made.kind == trace.SpanKind.SERVER
    assert made.parent is not None and made.parent.span_id == 0xF3
    attrs = dict(made.attributes or {})
    assert (attrs["gen_ai.request.model"], attrs["aios.inference.texts_computed"], attrs["aios.inference.tier"]) == \
        ("embedder", 1, "low_latency")
    assert carried["traceparent"].split("-")[2] == f"{made.context.span_id:016x}"
    assert carried["aios-operation"] == "embed"
