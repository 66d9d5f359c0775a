"""A tier's own HTTP door: a replica answering its latency class's calls itself.

Through Serve, an interactive call crosses three processes before the model: the
HTTP proxy, the router replica and the tier replica, each a hop over Ray and a
Python event loop that bulk requests also use. On the embedded 2-core stack that
path cost 13 ms at p50 when idle and 33.7 ms at p95 under bulk load, against 21.4
ms at p95 answered by the tier replica itself (``make bench``; DECISIONS 45). So a
tier whose spec sets ``direct_port`` also serves

  POST /v1/classify, POST /v1/embed   the router's contract and answers, for this
                                      tier's latency class only
  GET  /healthz                       200 once the model is loaded

on that port, from a small threaded HTTP server inside each replica. The model
call runs on the replica's one model thread, as Serve's calls do, so the two
doors share the model and its statistics. Replicas on one host share the port
(SO_REUSEPORT: the kernel spreads connections over them); on Kubernetes a
Service in front of the tier's worker pods does the same across hosts.

What the door leaves to the router: bulk calls (batched across callers), the
embedding cache, the model registry and statistics of the whole service. Callers
fall back to the router when the door does not answer (``InferenceClient``).

Ray-free: unit tests drive it with the real MiniLM model or a stand-in."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry import trace

from services.inference import contract, model, spans

__all__ = ["MAX_BODY_BYTES", "DirectDoor"]

log = logging.getLogger("aios.inference.direct")

# The largest valid body: MAX_TEXTS texts of MAX_TEXT_CHARS characters, each up to 4 bytes of
# UTF-8 once escaped as \uXXXX pairs (12 bytes), plus the JSON around them.
MAX_BODY_BYTES = contract.MAX_TEXTS * (contract.MAX_TEXT_CHARS * 12 + 8) + 1024

Run = Callable[[list[list[str]]], list[dict[str, Any]]]


class DirectDoor:
    """The HTTP door of one tier replica. ``run`` is the replica's model call (``TierModel.run_blocking``:
    one result per request, with labels, scores, vectors and version); ``record`` counts a call in the
    tier's statistics (``BatchStats.record``)."""

    def __init__(self, tier: str, run: Run, *, host: str, port: int,
                 record: Callable[[int, int, float], None] | None = None) -> None:
        self.tier = tier
        self.latency_class = next(c for c, t in contract.TIERS_BY_LATENCY_CLASS.items() if t == tier)
        self._run, self._record = run, record
        self._server = _Server((host, port), _handler(self))
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"{tier}-door", daemon=True)

    def start(self) -> DirectDoor:
        self._thread.start()
        log.info("tier %s answers %s calls directly on port %d", self.tier, self.latency_class, self.port)
        return self

    def close(self) -> None:
        """Stop answering and release the port (idempotent; a door never started just closes)."""
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever to return: only when it runs
        self._server.server_close()

    # -- one call ---------------------------------------------------------------------------------------
    def answer(self, op: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for a classify or embed call."""
        with spans.request_span(op, headers) as span:
            status, payload, extra = self._answer(op, body, span)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR, f"HTTP {status}")
            return status, payload, extra

    def _answer(self, op: str, body: bytes, span: trace.Span) -> tuple[int, dict[str, Any], dict[str, str]]:
        started = time.perf_counter()
        try:
            parsed = contract.parse_request(_json(body))
        except contract.BadInput as exc:
            return 400, {"error": str(exc)}, {}
        if parsed.latency_class != self.latency_class:
            return 400, {"error": f"this door of the {self.tier} tier takes latency_class "
                                  f"{self.latency_class!r} only; send {parsed.latency_class!r} calls to the "
                                  "router (AIOS_INFERENCE_URL)"}, {}
        carrier = spans.call_context(op)
        try:
            called = time.perf_counter()
            result = dict(self._run([parsed.texts])[0])
            model_s = time.perf_counter() - called
        except Exception as exc:  # the model thread died or the replica is stopping: retryable
            log.exception("direct %s failed", op)
            return 503, {"error": f"inference tier unavailable ({type(exc).__name__}); retry later"}, {}
        if self._record is not None:
            self._record(1, len(parsed.texts), model_s)
        result.update({"batch_texts": len(parsed.texts), "batch_requests": 1, "queue_ms": 0.0,
                       "model_ms": round(model_s * 1000, 2)})
        end_ns = time.time_ns()
        spans.model_call_spans(self.tier, [parsed.texts], [carrier], [result], end_ns - int(model_s * 1e9), end_ns)
        spans.describe(span, op, self.tier, parsed.latency_class, len(parsed.texts),
                       response_model=spans.response_model(op, str(result["version"])))
        if op == "classify":
            payload: dict[str, Any] = {
                "predictions": [{"label": label, "score": score}
                                for label, score in zip(result["labels"], result["scores"], strict=True)],
                "model": model.CLASSIFIER_NAME, "model_version": result["version"], "tier": self.tier}
        else:
            payload = {"embeddings": [v.tolist() for v in result["vectors"]], "model": model.EMBEDDER_NAME,
                       "dim": model.EMBEDDING_DIM, "tier": self.tier}
        timing = {"model": model_s * 1000, "door": (time.perf_counter() - started) * 1000}
        return 200, payload, {"Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items())}


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise contract.BadInput(
            'body is not valid JSON; send {"texts": ["..."], "latency_class": "interactive"}') from None


class _Server(ThreadingHTTPServer):
    allow_reuse_port = True  # replicas on one host share the port; the kernel spreads connections
    daemon_threads = True


def _handler(door: DirectDoor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a caller's connection serves many calls
        # Without it the body waits for the ACK of the headers' packet (Nagle), and the client
        # delays that ACK: measured 60 ms a call instead of 13.
        disable_nagle_algorithm = True
        server_version = "aios-inference-door"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/healthz":
                self._send(200, {"status": "ok", "tier": door.tier})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; this door serves POST /v1/classify, "
                                          "POST /v1/embed and GET /healthz"})

        def do_POST(self) -> None:
            op = {"/v1/classify": "classify", "/v1/embed": "embed"}.get(self.path.split("?")[0])
            if op is None:
                self._send(404, {"error": f"no such path {self.path!r}; this door serves POST /v1/classify, "
                                          "POST /v1/embed and GET /healthz"})
                return
            try:
                length = int(self.headers.get("Content-Length") or "")
            except ValueError:
                self._send(411, {"error": "send the body with a Content-Length header"}, close=True)
                return
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES} "
                                          f"({contract.MAX_TEXTS} texts of {contract.MAX_TEXT_CHARS} characters)"},
                           close=True)
                return
            body = self.rfile.read(length)
            status, payload, extra = door.answer(op, body, {k.lower(): v for k, v in self.headers.items()})
            self._send(status, payload, extra)

        def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None, *,
                  close: bool = False) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            if close:  # the body was not read: the connection cannot carry another request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

    return Handler

