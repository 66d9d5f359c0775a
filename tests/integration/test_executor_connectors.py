"""HTTP connectors against a tiny HTTP server on 127.0.0.1 (it records the raw
request path and answers with bodies of any size): path parameters cannot
change the path, and response bodies are read only up to the limit."""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.stack import Stack
from services.common.errors import InvalidArgument, PermanentError
from services.executor.adapters.connectors import HttpConnectors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Api(http.server.BaseHTTPRequestHandler):
    """GET/POST anything: records the raw path; ``/big/<n>`` answers n bytes of JSON,
    ``/stream/<n>`` the same without Content-Length (read until the connection closes)."""

    seen: list[tuple[str, str, str | None]] = []
    protocol_version = "HTTP/1.0"

    def _answer(self) -> None:
        Api.seen.append((self.command, self.path, self.headers.get("Idempotency-Key")))
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        parts = self.path.split("/")
        size = int(parts[2]) if len(parts) > 2 and parts[1] in ("big", "stream") else 0
        body = b'{"pad":"' + b"x" * max(0, size - 10) + b'"}' if size else b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if parts[1] != "stream":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 65536):
            try:
                self.wfile.write(body[i:i + 65536])
            except (BrokenPipeError, ConnectionResetError):
                return  # the client stopped reading at its limit

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def connectors(api: str, infra: Stack, tmp_path: Path) -> Iterator[HttpConnectors]:
    name = f"shop{uuid.uuid4().hex[:6]}"  # its own circuit breaker keys
    conf = tmp_path / "connectors.yaml"
    conf.write_text(f"""
connectors:
  {name}:
    base_url: {api}
    tools:
      get_item: {{method: GET, path: "/v1/items/{{item_id}}"}}
      tag_item: {{method: POST, path: "/v1/items/{{item_id}}/tags", body: [tag]}}
      big:      {{method: GET, path: "/big/{{n}}"}}
      stream:   {{method: GET, path: "/stream/{{n}}"}}
      refund:   {{method: POST, path: "/v1/refunds", body: [order_id, amount], amount: {{field: amount, unit: cents}}}}
  {name}roomy:
    base_url: {api}
    max_response_bytes: 4000000
    tools:
      big: {{method: GET, path: "/big/{{n}}"}}
""")
    client = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
    conns = HttpConnectors(client, conf, max_response_bytes=1024 * 1024)
    conns.name = name  # type: ignore[attr-defined]
    yield conns
    conns.close()
    client.close()


def test_path_parameters_cannot_change_the_path(connectors: HttpConnectors) -> None:
    name = connectors.name  # type: ignore[attr-defined]
    connectors.call(f"{name}.get_item", {"item_id": "../admin"}, "k1", 5)
    connectors.call(f"{name}.get_item", {"item_id": "a/b?x=1#frag"}, "k2", 5)
    connectors.call(f"{name}.tag_item", {"item_id": "%2e%2e", "tag": "t"}, "key-3", 5)
    assert Api.seen[-3:] == [("GET", "/v1/items/..%2Fadmin", None),
                             ("GET", "/v1/items/a%2Fb%3Fx%3D1%23frag", None),
                             ("POST", "/v1/items/%252e%252e/tags", "key-3")]
    with pytest.raises(InvalidArgument, match="item_id"):
        connectors.call(f"{name}.get_item", {}, "k4", 5)


def test_a_body_over_the_limit_is_not_read_and_fails_the_step(connectors: HttpConnectors) -> None:
    name = connectors.name  # type: ignore[attr-defined]
    assert connectors.call(f"{name}.big", {"n": 1024 * 1024}, "k", 5)["pad"].startswith("x")  # exactly the limit
    for tool in ("big", "stream"):  # declared by Content-Length, or found out while streaming
        with pytest.raises(PermanentError) as err:
            connectors.call(f"{name}.{tool}", {"n": 3 * 1024 * 1024}, "k", 5)
        message = str(err.value)
        assert not err.value.retryable
        for part in (f"connector {name}", f"{name}.{tool}", "1048576-byte limit", "AIOS_EXECUTOR_MAX_RESPONSE_BYTES",
                     f"connectors.{name}.max_response_bytes"):
            assert part in message, message
    assert connectors.breakers[name].state() == "closed", "a big answer is not the API failing"


def test_a_connector_can_raise_its_own_limit(connectors: HttpConnectors) -> None:
    name = connectors.name  # type: ignore[attr-defined]
    out = connectors.call(f"{name}roomy.big", {"n": 3 * 1024 * 1024}, "k", 5)
    assert len(out["pad"]) == 3 * 1024 * 1024 - 10


def test_a_declared_amount_the_policy_could_not_read_is_not_paid(connectors: HttpConnectors) -> None:
    """The policy judged the declared input (and failed closed on an unreadable one); the connector
    pays that same input, and never a value nobody could read as whole cents."""
    name = connectors.name  # type: ignore[attr-defined]
    connectors.call(f"{name}.refund", {"order_id": "o1", "amount": 1500}, "r-ok", 5)
    assert Api.seen[-1] == ("POST", "/v1/refunds", "r-ok")
    for bad in ("15k", 12.5, None, -1):
        with pytest.raises(InvalidArgument, match="amount"):
            connectors.call(f"{name}.refund", {"order_id": "o1", "amount": bad}, "r-bad", 5)
    assert Api.seen[-1] == ("POST", "/v1/refunds", "r-ok")  # none of them reached the API
