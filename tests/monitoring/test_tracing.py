"""Traces continue across the gRPC edge (OpenTelemetry gRPC instrumentation on
``grpc_server``'s servers and channels), the edge counts and times calls, model calls
over httpx carry the GenAI attributes, and export follows the OTEL_* variables."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from infra.stack import procs
from services.common import grpc_server, tracing
from services.common.errors import NotFound
from tests.span_capture import finished_spans

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with finished_spans("tracing-test") as exporter:
        tracing._instrument_httpx()
        yield exporter


def _echo(seen: dict[str, str]) -> grpc.GenericRpcHandler:
    def say(request: bytes, _context: grpc.ServicerContext) -> bytes:
        seen["trace_id"] = tracing.current_trace_id()
        if request == b"missing":
            raise NotFound("no such thing")
        return request

    return grpc.method_handlers_generic_handler("aios.test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say, request_deserializer=bytes, response_serializer=bytes)})


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, dict[str, str]]]:
    seen: dict[str, str] = {}
    port = procs.free_port()
    server, _health = grpc_server.serve_grpc(
        f"127.0.0.1:{port}", [(lambda h, s: s.add_generic_rpc_handlers((h,)), _echo(seen), "aios.test.Echo")])
    yield f"127.0.0.1:{port}", seen
    server.stop(0)


def handled(code: str) -> float:
    return REGISTRY.get_sample_value("aios_grpc_server_handled_total", {
        "grpc_service": "aios.test.Echo", "grpc_method": "Say", "grpc_code": code}) or 0.0


def test_a_grpc_call_continues_the_callers_trace(spans: InMemorySpanExporter, echo: Any) -> None:
    address, seen = echo
    ok_before = handled("OK")
    with grpc_server.channel(address) as chan:
        say = chan.unary_unary("/aios.test.Echo/Say", request_serializer=bytes, response_deserializer=bytes)
        with tracing.tracer().start_as_current_span("caller") as caller:
            assert say(b"hi", timeout=10, metadata=grpc_server.trace_metadata()) == b"hi"
    trace_id = caller.get_span_context().trace_id
    assert seen["trace_id"] == format(trace_id, "032x")
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_kind = {s.kind: s for s in mine}
    client, server = by_kind[SpanKind.CLIENT], by_kind[SpanKind.SERVER]
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.attributes is not None and server.attributes["rpc.method"] == "Say"
    assert handled("OK") == ok_before + 1


def test_mesh_errors_keep_their_status_and_are_counted(spans: InMemorySpanExporter, echo: Any) -> None:
    address, _seen = echo
    before = handled("NOT_FOUND")
    with grpc_server.channel(address) as chan:
        say = chan.unary_unary("/aios.test.Echo/Say", request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as failed:
            say(b"missing", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND and "no such thing" in str(failed.value.details())
    assert handled("NOT_FOUND") == before + 1
    assert REGISTRY.get_sample_value("aios_grpc_server_handling_seconds_count", {
        "grpc_service": "aios.test.Echo", "grpc_method": "Say"}) >= 1


def test_health_checks_make_no_spans(spans: InMemorySpanExporter, echo: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, _seen = echo
    spans.clear()
    with grpc_server.channel(address) as chan:
        health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert spans.get_finished_spans() == ()


class _Inference(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.traceparent = self.headers.get("traceparent", "")  # type: ignore[attr-defined]
        answer = json.dumps({"predictions": [{"label": "card_arrival", "score": 0.9}] * len(body["texts"]),
                             "model": "intent", "model_version": "1", "tier": "high_throughput"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: Any) -> None:
        pass


def test_model_calls_carry_genai_attributes_and_the_trace(spans: InMemorySpanExporter) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Inference)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{httpd.server_port}") as client, \
                tracing.tracer().start_as_current_span("step") as step:
            client.post("/v1/classify", json={"texts": ["a", "b", "c"], "latency_class": "bulk"}).raise_for_status()
    finally:
        httpd.shutdown()
    trace_id = step.get_span_context().trace_id
    [call] = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id and s.kind == SpanKind.CLIENT]
    assert call.name == "classify intent-classifier"
    attrs = dict(call.attributes or {})
    assert {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.request.model", "aios.inference.tier",
                                  "aios.inference.texts")} == {
        "gen_ai.operation.name": "classify", "gen_ai.request.model": "intent-classifier",
        "aios.inference.tier": "high_throughput", "aios.inference.texts": 3}
    assert format(trace_id, "032x") in httpd.traceparent  # type: ignore[attr-defined]


def test_chat_completions_are_genai_chat_spans() -> None:
    attrs = tracing.genai_attributes("/v1/chat/completions", {"model": "llama-3", "max_tokens": 64})
    assert attrs == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                     "gen_ai.request.model": "llama-3", "gen_ai.request.max_tokens": 64}
    assert tracing.genai_attributes("/orders", {"model": "x"}) == {}


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "opentelemetry.exporter.otlp.proto.http"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "opentelemetry.exporter.otlp.proto.grpc"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
])
def test_export_follows_the_otel_variables(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                           expected: str | None) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    processor = tracing._exporter_processor("")
    try:
        if expected is None:
            assert processor is None
        else:
            assert isinstance(processor, BatchSpanProcessor)
            assert type(processor.span_exporter).__module__.startswith(expected)
    finally:
        if processor is not None:
            processor.shutdown()


def test_the_older_aios_endpoint_still_exports_over_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    processor = tracing._exporter_processor("127.0.0.1:4317")
    assert isinstance(processor, BatchSpanProcessor)
    assert type(processor.span_exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
    processor.shutdown()


def test_each_step_of_an_executor_batch_continues_its_own_trace(spans: InMemorySpanExporter) -> None:
    from services.common.kafka import Inbound
    from tests.unit.test_executor_handlers import Mesh

    mesh = Mesh()
    seen: dict[str, str] = {}
    mesh.tool("trace.echo", lambda inputs, _call: seen.setdefault(inputs["who"], tracing.current_trace_id()))
    parents = {"a": "0af7651916cd43dd8448eb211c80319c", "b": "4bf92f3577b34da6a3ce929d0e0e4736"}
    records = [Inbound(topic="t.step.requests", role="step_requests", partition=0, offset=i, key=f"run-{who}",
                       schema="StepRequest", value=mesh.request(f"k-{who}", 1, "trace.echo", who=who),
                       headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}, idempotency_key=f"k-{who}")
               for i, (who, trace_id) in enumerate(parents.items())]
    try:
        mesh.handler.handle(records)
    finally:
        mesh.close()
    assert seen == parents  # the tool ran inside its own request's trace, in a worker thread
    steps = [s for s in spans.get_finished_spans() if s.name == "executor step"]
    assert {format(s.context.trace_id, "032x") for s in steps} >= set(parents.values())
    assert all(s.parent is not None and s.parent.span_id == 0xB7AD6B7169203331 for s in steps
               if format(s.context.trace_id, "032x") in parents.values())


def test_a_stored_context_can_be_injected_later() -> None:
    parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert tracing.inject(tracing.extract(parent))["traceparent"] == parent["traceparent"]
    assert "traceparent" not in tracing.inject(tracing.extract({}))



def test_spans_are_recorded_only_while_something_exports_them() -> None:
    """No exporter and no processor: spans still carry valid ids (logs, headers and child services
    continue the trace) but record nothing, so a mesh without a collector pays no per-span work.
    A processor added later (a collector, a test's capture) turns recording on at once."""
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = tracing.new_provider()
    tracer = provider.get_tracer("t")
    quiet = tracer.start_span("nobody listens")
    assert quiet.get_span_context().is_valid and not quiet.is_recording()
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(quiet))
    assert headers["traceparent"].split("-")[1] == format(quiet.get_span_context().trace_id, "032x")
    quiet.end()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    child = tracer.start_span("now exported", context=trace.set_span_in_context(quiet))
    assert child.is_recording()
    assert child.get_span_context().trace_id == quiet.get_span_context().trace_id
    child.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["now exported"]
    provider.shutdown()


def test_a_trace_the_caller_sampled_out_stays_out() -> None:
    """Once exporting, an upstream decision not to sample is followed (parent-based): only a parent
    dropped because its own process had nothing to export it is decided afresh."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    provider = tracing.new_provider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    tracer = provider.get_tracer("t")
    upstream = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                           trace_flags=TraceFlags(0))
    out = tracer.start_span("sampled out upstream", context=trace.set_span_in_context(NonRecordingSpan(upstream)))
    assert not out.is_recording()
    unexported = SpanContext(upstream.trace_id, upstream.span_id, is_remote=True, trace_flags=TraceFlags(0),
                             trace_state=TraceState([("aios", "unrecorded")]))
    kept = tracer.start_span("no collector upstream", context=trace.set_span_in_context(NonRecordingSpan(unexported)))
    assert kept.is_recording() and kept.get_span_context().trace_id == upstream.trace_id
    assert kept.get_span_context().trace_state.get("aios") is None  # the mark stops here
    provider.shutdown()


def test_the_process_provider_samples_with_the_exporter_aware_sampler(spans: InMemorySpanExporter) -> None:
    from opentelemetry import trace

    assert isinstance(trace.get_tracer_provider().sampler, tracing.RecordWhenExported)


def test_a_sampler_named_in_the_environment_still_decides_once_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = tracing.new_provider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    span = provider.get_tracer("t").start_span("sampled out by the operator")
    assert span.get_span_context().is_valid and not span.is_recording()
    provider.shutdown()
