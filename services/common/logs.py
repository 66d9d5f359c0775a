"""Structured logs. Every line carries service, run id, tenant and trace id,
taken from context variables that the consumer loop and gRPC edge set."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_service = "aios"
run_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")


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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": _service,
            "logger": record.name,
            "msg": record.getMessage(),
            "run_id": run_id_var.get(),
            "tenant": tenant_var.get(),
            "trace_id": trace_id_var.get(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        ctx = " ".join(f"{k}={v.get()}" for k, v in
                       (("run", run_id_var), ("tenant", tenant_var), ("trace", trace_id_var)) if v.get())
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
