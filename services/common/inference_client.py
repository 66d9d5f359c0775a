"""Client of the inference service (Ray Serve router, HTTP). Shared runtime,
import-light: no Ray or torch. Services call the router, never each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from services.common.errors import InvalidArgument, TransientError

MAX_TEXTS = 256  # the router's per-request limit; larger batches are split here


class InferenceUnavailable(TransientError):
    """The inference service cannot answer now (down, overloaded, 5xx)."""


class InferenceBadRequest(InvalidArgument):
    """The inference service refused the request as sent (4xx)."""


@dataclass(frozen=True)
class ClassifyResult:
    predictions: list[dict[str, Any]]
    model: str
    model_version: str
    tier: str


class InferenceClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))

    def _post(self, path: str, texts: list[str], latency_class: str) -> dict[str, Any]:
        try:
            resp = self._http.post(path, json={"texts": texts, "latency_class": latency_class})
        except httpx.HTTPError as exc:
            raise InferenceUnavailable(f"inference {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise InferenceUnavailable(f"inference {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        if resp.status_code >= 400:
            raise InferenceBadRequest(f"inference {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        body: dict[str, Any] = resp.json()
        return body

    def classify(self, texts: list[str], latency_class: str = "interactive") -> ClassifyResult:
        predictions: list[dict[str, Any]] = []
        body: dict[str, Any] = {}
        for start in range(0, len(texts), MAX_TEXTS):
            body = self._post("/v1/classify", texts[start:start + MAX_TEXTS], latency_class)
            predictions.extend(body["predictions"])
        return ClassifyResult(predictions, body.get("model", ""), body.get("model_version", ""), body.get("tier", ""))

    def embed(self, texts: list[str], latency_class: str = "interactive") -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(texts), MAX_TEXTS):
            out.extend(self._post("/v1/embed", texts[start:start + MAX_TEXTS], latency_class)["embeddings"])
        return out

    def close(self) -> None:
        self._http.close()
