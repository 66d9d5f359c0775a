"""How the inference client classifies HTTP answers: "not now" is retryable, a bad
request is not. Ray Serve's proxy answers 404 for every path while an application
(re)starts, so a 404 on the client's fixed routes is "not now"."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from services.common.inference_client import InferenceBadRequest, InferenceClient, InferenceUnavailable

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def answering() -> Iterator[tuple[list[int], str]]:
    status = [404]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"detail": "Path not found"}'
            self.send_response(status[0])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield status, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("code", [404, 408, 429, 500, 503])
def test_not_now_answers_are_retryable(answering: tuple[list[int], str], code: int) -> None:
    status, url = answering
    status[0] = code
    with pytest.raises(InferenceUnavailable) as err:
        InferenceClient(url, 5).classify(["hello"], "bulk")
    assert err.value.retryable


@pytest.mark.parametrize("code", [400, 422])
def test_a_bad_request_is_not_retryable(answering: tuple[list[int], str], code: int) -> None:
    status, url = answering
    status[0] = code
    with pytest.raises(InferenceBadRequest) as err:
        InferenceClient(url, 5).classify(["hello"], "bulk")
    assert not err.value.retryable
