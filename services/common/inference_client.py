"""Synchronous client of the inference service (shared runtime: planner, memory, executor).

Import-light on purpose (httpx only; no Ray or torch), so
importing it costs milliseconds. Errors carry ``retryable``: connection
failures, timeouts and 5xx raise ``InferenceUnavailable`` (retry later); 4xx
raises ``InferenceBadRequest`` (the same call can never succeed).

With ``interactive_url`` (AIOS_INFERENCE_INTERACTIVE_URL), interactive calls go to the
low-latency tier's direct door (services/inference/direct.py), past Serve's proxy and
router. A door that does not answer (refused, timed out, 5xx) is skipped for
``DOOR_COOL_DOWN_S`` and the call goes through the router at once, so a restarting
replica costs one fallback, not a failed call. A door that is full or stopping answers 503
and a wrong one 421 (both fall back); a read timeout does not (the call's time is spent)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from services.common.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

# The contract's latency classes; services/inference/contract.py maps them to tiers
# (a unit test keeps the two in step: services never import each other).
TIERS_BY_LATENCY_CLASS = {"interactive": "low_latency", "bulk": "high_throughput"}
MAX_TEXTS = 256


class InferenceUnavailable(TransientError):
    """The service could not answer now (down, restarting, overloaded, timed out)."""

    retryable = True

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class InferenceBadRequest(PermanentError):
    """The service rejected the request; the message says what to fix."""

    retryable = False

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyResult:
    predictions: list[Prediction]
    model: str
    model_version: str
    tier: str

    @property
    def model_ref(self) -> str:
        """``name@version``, as recorded in audit records."""
        return f"{self.model}@{self.model_version}"


class InferenceClient:
    """One pooled HTTP connection set per client; share one client per process."""

    DOOR_COOL_DOWN_S = 5.0  # how long a door that failed is skipped
    DOOR_CONNECT_S = 0.5  # a door on the same network answers a connect at once, or is not there

    def __init__(self, base_url: str, timeout_s: float = 10.0, *, interactive_url: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=limits)
        self.interactive_url = interactive_url.rstrip("/")
        self._door = (httpx.Client(base_url=self.interactive_url, limits=limits,
                                   timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, self.DOOR_CONNECT_S)))
                      if self.interactive_url else None)
        self._door_closed_until = 0.0
        self._lock = threading.Lock()
        self.door_fallbacks = 0  # calls the router answered because the door did not

    def classify(self, texts: list[str], latency_class: str = "interactive") -> ClassifyResult:
        """Intent label and probability per text."""
        body = self._post("/v1/classify", texts, latency_class)
        return ClassifyResult(
            predictions=[Prediction(str(p["label"]), float(p["score"])) for p in body["predictions"]],
            model=str(body["model"]), model_version=str(body["model_version"]), tier=str(body["tier"]))

    def embed(self, texts: list[str], latency_class: str = "interactive") -> list[list[float]]:
        """Unit-norm 384-dim embedding per text."""
        return [list(map(float, v)) for v in self._post("/v1/embed", texts, latency_class)["embeddings"]]

    def models(self) -> dict[str, Any]:
        """The model registry (aliases, versions, costs, tiers)."""
        return self._request("GET", "/v1/models")

    def healthy(self) -> bool:
        try:
            self._request("GET", "/healthz")
        except (InferenceUnavailable, InferenceBadRequest):
            return False
        return True

    def close(self) -> None:
        self._http.close()
        if self._door is not None:
            self._door.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _post(self, path: str, texts: list[str], latency_class: str) -> dict[str, Any]:
        if latency_class not in TIERS_BY_LATENCY_CLASS:
            # Checked here too so a typo fails fast, without a round trip.
            raise InferenceBadRequest(f"latency_class must be one of {sorted(TIERS_BY_LATENCY_CLASS)}; "
                                      f"got {latency_class!r}")
        body = {"texts": texts, "latency_class": latency_class}
        if self._door is not None and latency_class == "interactive" and time.monotonic() >= self._door_closed_until:
            answered = self._via_door(path, body)
            if answered is not None:
                return answered
        return self._request("POST", path, json=body)

    def _via_door(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The door's answer, or None when the call must go to the router: the door is not there
        (refused, connect timeout, connection dropped), is full or stopping (503), or is the wrong
        door (404, 421). A read timeout is not retried: the call's time is spent."""
        assert self._door is not None
        try:
            response = self._door.post(path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            self._skip_door(f"{type(exc).__name__}: {exc}")
            return None
        except httpx.TimeoutException as exc:
            raise InferenceUnavailable(f"inference at {self.interactive_url} timed out on {path}: {exc}") from exc
        except httpx.TransportError as exc:
            self._skip_door(f"{type(exc).__name__}: {exc}")
            return None
        if response.status_code in (404, 421, 503):
            self._skip_door(f"{response.status_code} {_message(response)}")
            return None
        return self._answer(path, response)

    def _skip_door(self, why: str) -> None:
        with self._lock:
            first = time.monotonic() >= self._door_closed_until
            self._door_closed_until = time.monotonic() + self.DOOR_COOL_DOWN_S
            self.door_fallbacks += 1
        if first:
            log.warning("inference door %s did not answer (%s); interactive calls go through the router for "
                        "%.0f s", self.interactive_url, why, self.DOOR_COOL_DOWN_S)

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise InferenceUnavailable(f"inference at {self.base_url} timed out on {path}: {exc}") from exc
        except httpx.TransportError as exc:
            raise InferenceUnavailable(f"inference at {self.base_url} unreachable: {exc}") from exc
        return self._answer(path, response)

    @staticmethod
    def _answer(path: str, response: httpx.Response) -> dict[str, Any]:
        # 408/429 are "not now" rather than "never": retryable like a 5xx. So is 404: the client calls
        # fixed routes only, and Ray Serve's proxy answers 404 for every path until a (re)starting
        # application's routes reach it (a restart, a KubeRay rollout), never for a bad request.
        if response.status_code >= 500 or response.status_code in (404, 408, 429):
            raise InferenceUnavailable(f"inference {path} answered {response.status_code}: {_message(response)}",
                                       status_code=response.status_code)
        if response.status_code >= 400:
            raise InferenceBadRequest(f"inference {path} rejected the request: {_message(response)}",
                                      status_code=response.status_code)
        data: dict[str, Any] = response.json()
        return data


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error") or body.get("detail") or body) if isinstance(body, dict) else str(body)[:200]
