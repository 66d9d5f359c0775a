"""A tier's own HTTP door: a replica answering its latency class's calls itself.

Through Serve, an interactive call crosses three processes before the model: the
HTTP proxy, the router replica and the tier replica, each a hop over Ray and a
Python event loop that bulk requests also use. On the embedded 2-core stack that
path cost ~13 ms at p50 over the model call when idle; under bulk load ``make
bench`` measured p50 19.7 ms at the door against 34.2 ms through the router,
calls taking turns (DECISIONS 45). So a
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
fall back to the router when the door does not answer, is full or is closing
(connection refused, 503, 421; ``InferenceClient``): the door holds at most
``max_ongoing`` calls and answers 503 at once beyond that, cuts a call into
model calls of at most ``max_batch_size`` texts (so one big call does not hold
the model thread while others wait), and on ``close`` (the replica stopping)
answers 503 on connections already open.

Ray-free: unit tests drive it with the real MiniLM model or a stand-in."""

from __future__ import annotations

import json
import logging
import socket
import socketserver
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
IDLE_TIMEOUT_S = 30.0  # a connection that sends nothing for this long is closed (it holds a thread)

Run = Callable[[list[list[str]]], list[dict[str, Any]]]
Answer = tuple[int, dict[str, Any], dict[str, str]]


class DirectDoor:
    """The HTTP door of one tier replica. ``run`` is the replica's model call (``TierModel.run_blocking``:
    one result per request, with labels, scores, vectors, version, queue_ms and model_ms); ``record``
    counts a model call in the tier's statistics (``BatchStats.record``)."""

    def __init__(self, tier: str, run: Run, *, host: str, port: int, max_batch_size: int = 8,
                 max_ongoing: int = 32, record: Callable[[int, int, float], None] | None = None) -> None:
        self.tier = tier
        self.latency_class = next(c for c, t in contract.TIERS_BY_LATENCY_CLASS.items() if t == tier)
        self._run, self._record = run, record
        self.max_batch_size = max_batch_size
        self._room = threading.BoundedSemaphore(max_ongoing)
        self.closing = threading.Event()
        self._server = _server_for(host)((host, port), _handler(self))
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"{tier}-door", daemon=True)

    def start(self) -> DirectDoor:
        self._thread.start()
        log.info("tier %s answers %s calls directly on port %d", self.tier, self.latency_class, self.port)
        return self

    def close(self) -> None:
        """Stop taking connections and release the port; calls on connections already open are answered
        503 (closing the connection), so their callers go to the router. Idempotent; a door never started
        just closes."""
        self.closing.set()
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever to return: only when it runs
        self._server.server_close()

    # -- one call ---------------------------------------------------------------------------------------
    def answer(self, op: str, body: bytes, headers: dict[str, str]) -> Answer:
        """(status, JSON body, extra headers) for a classify or embed call."""
        if not self._room.acquire(blocking=False):
            return 503, {"error": f"the {self.tier} tier's door is full; send the call to the router "
                                  "(AIOS_INFERENCE_URL) or retry"}, {}
        try:
            with spans.request_span(op, headers) as span:
                status, payload, extra = self._answer(op, body, span)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.StatusCode.ERROR, f"HTTP {status}")
                return status, payload, extra
        finally:
            self._room.release()

    def _answer(self, op: str, body: bytes, span: trace.Span) -> Answer:
        started = time.perf_counter()
        try:
            parsed = contract.parse_body(body)
        except contract.BadInput as exc:
            return 400, {"error": str(exc)}, {}
        if parsed.latency_class != self.latency_class:
            # 421 Misdirected Request: the call is fine, this door is the wrong one; a client falls back.
            return 421, {"error": f"this door of the {self.tier} tier takes latency_class "
                                  f"{self.latency_class!r} only; send {parsed.latency_class!r} calls to the "
                                  "router (AIOS_INFERENCE_URL)"}, {}
        carrier = spans.call_context(op)
        try:
            results = [self._call(parsed.texts[i:i + self.max_batch_size])
                       for i in range(0, len(parsed.texts), self.max_batch_size)]
        except Exception as exc:  # the model thread died or the replica is stopping: retryable
            log.exception("direct %s failed", op)
            return 503, {"error": f"inference tier unavailable ({type(exc).__name__}); retry later"}, {}
        queue_ms = sum(float(r.get("queue_ms", 0.0)) for r in results)
        model_ms = sum(float(r.get("model_ms", 0.0)) for r in results)
        merged = {"labels": [label for r in results for label in r["labels"]],
                  "scores": [score for r in results for score in r["scores"]],
                  "vectors": [v for r in results for v in r["vectors"]], "version": results[0]["version"],
                  "batch_texts": max(len(r["labels"]) for r in results), "batch_requests": 1,
                  "queue_ms": round(queue_ms, 2), "model_ms": round(model_ms, 2)}
        end_ns = time.time_ns()
        spans.model_call_spans(self.tier, [parsed.texts], [carrier], [merged],
                               end_ns - int((queue_ms + model_ms) * 1e6), end_ns)
        spans.describe(span, op, self.tier, parsed.latency_class, len(parsed.texts),
                       response_model=spans.response_model(op, str(merged["version"])))
        payload = model.classify_answer(merged["labels"], merged["scores"], merged["version"], self.tier) \
            if op == "classify" else model.embed_answer(merged["vectors"], self.tier)
        timing = {"queue": queue_ms, "model": model_ms, "door": (time.perf_counter() - started) * 1000}
        return 200, payload, {"Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items())}

    def _call(self, texts: list[str]) -> dict[str, Any]:
        """One model call of at most max_batch_size texts, counted in the tier's statistics."""
        result = dict(self._run([texts])[0])
        if self._record is not None:
            self._record(1, len(texts), float(result.get("model_ms", 0.0)) / 1000)
        return result


def _server_for(host: str) -> type[ThreadingHTTPServer]:
    """The server class for ``host``: IPv6 for an IPv6 address (``::`` takes both families)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        allow_reuse_port = True  # replicas on one host share the port; the kernel spreads connections
        daemon_threads = True

        def server_bind(self) -> None:
            if family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            # HTTPServer.server_bind also looks the host's name up (getfqdn): a DNS query at replica
            # start for nothing the door uses.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, int(self.server_address[1])

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.warning("direct door: connection from %s failed", client_address, exc_info=True)

    return Server


_PATHS = "this door serves POST /v1/classify, POST /v1/embed and GET /healthz"


def _handler(door: DirectDoor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a caller's connection serves many calls
        # Without it the body waits for the ACK of the headers' packet (Nagle), and the client
        # delays that ACK: measured 60 ms a call instead of 13.
        disable_nagle_algorithm = True
        server_version = "aios-inference-door"
        sys_version = ""
        timeout = IDLE_TIMEOUT_S

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # The stdlib's HTML error page echoes the request line; answer JSON and close instead.
            self._send(code, {"error": f"{message or self.responses.get(code, ('',))[0]}; {_PATHS}"}, close=True)

        def do_GET(self) -> None:
            if door.closing.is_set():
                self._send(503, {"error": "this replica is stopping"}, close=True)
            elif self.path.split("?")[0] == "/healthz" and not self.headers.get("Content-Length"):
                self._send(200, {"status": "ok", "tier": door.tier})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; {_PATHS}"}, close=True)

        def do_POST(self) -> None:
            op = {"/v1/classify": "classify", "/v1/embed": "embed"}.get(self.path.split("?")[0])
            if door.closing.is_set():  # the replica is stopping: the caller goes to the router
                self._send(503, {"error": "this replica is stopping; send the call to the router"}, close=True)
                return
            if op is None:  # the body is not read: the connection cannot carry another request
                self._send(404, {"error": f"no such path {self.path!r}; {_PATHS}"}, close=True)
                return
            if self.headers.get("Transfer-Encoding"):
                self._send(411, {"error": "send the body with a Content-Length header, not chunked"}, close=True)
                return
            try:
                length = int(self.headers.get("Content-Length") or "")
            except ValueError:
                length = -1
            if length < 0:
                self._send(411, {"error": "send the body with a Content-Length header"}, close=True)
                return
            if length > MAX_BODY_BYTES:
                self._send(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES} "
                                          f"({contract.MAX_TEXTS} texts of {contract.MAX_TEXT_CHARS} characters)"},
                           close=True)
                return
            body = self.rfile.read(length)
            try:
                status, payload, extra = door.answer(op, body, {k.lower(): v for k, v in self.headers.items()})
            except Exception as exc:  # a defect here must still answer, and name no internals
                log.exception("direct door %s failed", op)
                status, payload, extra = 500, {"error": f"the door failed ({type(exc).__name__})"}, {}
            self._send(status, payload, extra)

        def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None, *,
                  close: bool = False) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the caller gave up (timed out) and closed: nothing to answer
                self.close_connection = True

    return Handler
