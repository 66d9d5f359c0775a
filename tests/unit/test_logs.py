"""Log lines are one JSON object each and carry run id, tenant and trace id wherever a run is
concerned: from log_context, from the current span, from ``extra`` per line, across a thread pool."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common import logs, tracing

pytestmark = pytest.mark.timeout(10)
_provider = TracerProvider()  # a private provider: no global state shared with other tests
_tracer = _provider.get_tracer("test")


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs._JsonFormatter())
    logger = logging.getLogger(f"aios.test.logs.{id(out)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, out
    logger.handlers.clear()


def parsed(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_every_line_has_the_run_fields_even_outside_a_run(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    logger.info("starting %s", "up")
    [line] = parsed(out)
    assert line["msg"] == "starting up"
    assert {k: line[k] for k in ("run_id", "tenant", "trace_id", "span_id")} == \
        {"run_id": "", "tenant": "", "trace_id": "", "span_id": ""}
    assert {"ts", "level", "service", "logger"} <= set(line)


def test_log_context_binds_run_tenant_and_trace(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    with logs.log_context(run_id="r1", tenant="acme", trace_id="ab" * 16):
        logger.warning("inside")
    logger.info("after")
    inside, after = parsed(out)
    assert (inside["run_id"], inside["tenant"], inside["trace_id"]) == ("r1", "acme", "ab" * 16)
    assert (after["run_id"], after["tenant"], after["trace_id"]) == ("", "", "")


def test_trace_and_span_come_from_the_current_span(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    with _tracer.start_as_current_span("work") as span, logs.log_context(run_id="r2", tenant="acme"):
        logger.info("in a span")
    [line] = parsed(out)
    ctx = span.get_span_context()
    assert line["trace_id"] == format(ctx.trace_id, "032x") and line["span_id"] == format(ctx.span_id, "016x")
    assert line["run_id"] == "r2"


def test_extra_names_the_run_of_one_line(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    with logs.log_context(run_id="batch-first", tenant="acme"):
        logger.info("record", extra={"run_id": "r3", "tenant": "globex"})
    [line] = parsed(out)
    assert (line["run_id"], line["tenant"]) == ("r3", "globex")


def test_a_traceback_stays_on_its_line(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    with logs.log_context(run_id="r4", tenant="acme"):
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("failed")
    [line] = parsed(out)
    assert "ValueError" in str(line["exc"]) and line["run_id"] == "r4"


def test_thread_pool_work_keeps_the_context(lines) -> None:  # type: ignore[no-untyped-def]
    logger, out = lines
    with ThreadPoolExecutor(2) as pool, _tracer.start_as_current_span("batch") as span, \
            logs.log_context(run_id="r5", tenant="acme"):
        pool.submit(tracing.in_current_context(logger.info), "bound").result()
        pool.submit(logger.info, "unbound").result()
    bound, unbound = parsed(out)
    assert (bound["run_id"], bound["trace_id"]) == ("r5", format(span.get_span_context().trace_id, "032x"))
    assert (unbound["run_id"], unbound["trace_id"]) == ("", "")


def test_text_format_names_the_run() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with logs.log_context(run_id="r6", tenant="acme", trace_id="cd" * 16):
        text = logs._TextFormatter().format(record)
    assert "hello" in text and "run=r6" in text and "tenant=acme" in text and f"trace={'cd' * 16}" in text

