"""Structured logs: one JSON object per line, so a log query and a trace meet.

Every line carries ``service``, ``run_id``, ``tenant``, ``trace_id`` and ``span_id``
(empty strings when the line concerns no run). Where they come from, in order:

1. ``extra={"run_id": ..., "tenant": ...}`` on the call itself, for a line about a run
   other than the one in context (a batch handler logging per record);
2. ``log_context`` (the consumer loop binds the record's key, tenant and trace; the gRPC
   edge binds the request's run id and tenant);
3. for ``trace_id``/``span_id``: the current OpenTelemetry span when the context binds no
   trace id, so a line logged inside any span names its trace.

Context variables do not cross into thread pools by themselves: submit work with
``tracing.in_current_context(fn)`` to keep both the trace and these fields."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

__all__ = ["configure_logging", "log_context", "run_fields"]

_service = "aios"
run_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")
_RUN_FIELDS = ("run_id", "tenant", "trace_id", "span_id")


@contextmanager
def log_context(*, run_id: str = "", tenant: str = "", trace_id: str = "") -> Iterator[None]:
    """Bind run id, tenant and trace id to every log line inside the block."""
    tokens = [run_id_var.set(run_id), tenant_var.set(tenant), trace_id_var.set(trace_id)]
    try:
        yield
    finally:
        trace_id_var.reset(tokens[2])
        tenant_var.reset(tokens[1])
        run_id_var.reset(tokens[0])


def run_fields(record: logging.LogRecord | None = None) -> dict[str, str]:
    """run_id, tenant, trace_id and span_id for a line: the record's own (``extra``), else the
    bound context, else (trace and span) the current span."""
    span = trace.get_current_span().get_span_context()
    fields = {"run_id": run_id_var.get(), "tenant": tenant_var.get(),
              "trace_id": trace_id_var.get() or (format(span.trace_id, "032x") if span.is_valid else ""),
              "span_id": format(span.span_id, "016x") if span.is_valid else ""}
    if record is not None:
        for name in _RUN_FIELDS:
            value = getattr(record, name, None)
            if value:
                fields[name] = str(value)
    return fields


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": _service,
            "logger": record.name,
            "msg": record.getMessage(),
            **run_fields(record),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update({k: v for k, v in extra.items() if k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        # json.dumps escapes newlines, so a traceback stays on its line.
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = run_fields(record)
        ctx = " ".join(f"{short}={fields[name]}" for short, name in
                       (("run", "run_id"), ("tenant", "tenant"), ("trace", "trace_id")) if fields[name])
        msg = f"{ts} {record.levelname[0]} {_service} {record.getMessage()} {ctx}".rstrip()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Install the service's handler on the root logger (idempotent)."""
    global _service
    _service = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
