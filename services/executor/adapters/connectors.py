"""Declarative HTTP connectors (``services/executor/connectors.yaml``) with
idempotency keys, transient-versus-permanent error classes, bounded response
bodies and circuit breakers shared by every executor replica through Redis."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import redis
import yaml

from services.common.amounts import AmountField, parse_amount_fields
from services.common.errors import ConfigError, InvalidArgument, PermanentError, TransientError
from services.executor.adapters.rate_limits import RateLimit
from services.executor.adapters.redis_calls import redis_call

__all__ = ["CONNECTORS_FILE", "CircuitBreaker", "CircuitOpen", "HttpConnectors", "HttpTool", "expand_env"]

CONNECTORS_FILE = Path(__file__).resolve().parent.parent / "connectors.yaml"
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
_ENV = re.compile(r"\$\{([A-Z0-9_]+)(?::-((?:[^{}]|\$\{[^}]*\})*))?\}")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_ERROR_BODY_BYTES = 4096  # an error response is only quoted, never parsed


class CircuitOpen(TransientError):
    """The connector failed repeatedly; calls are refused until it cools down."""


def expand_env(text: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` (defaults may nest) from the environment."""
    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        return value if value else expand_env(m.group(2) or "")
    return _ENV.sub(sub, text)


@dataclass(frozen=True)
class HttpTool:
    connector: str
    name: str
    method: str
    path: str
    body: tuple[str, ...]
    amount: AmountField | None = None  # the input this tool pays, as the policy judged it
    # Inputs whose PII tokens this tool's API needs opened (a card id in the bank's path); no other
    # tool ever sees a token's value (services.common.pii_tokens).
    detokenize: tuple[str, ...] = ()
    # How long a call of this tool waits for a rate-limit slot; None: its connector's (or the tenant
    # limit's) max_wait_ms. 0 fails at once as RateLimited (an effect that must not run late).
    max_wait_ms: int | None = None



class CircuitBreaker:
    """Counts failures per connector in a Redis window shared by all replicas.

    Closed until ``failure_threshold`` failures fall within ``window_s``; then
    open for ``open_s`` (calls fail fast, as transient); then half-open: one
    caller takes the trial slot, the others still fail fast. A successful trial
    closes the circuit; a failed trial opens it again at once. Redis errors are
    the mesh's errors (``redis_call``): unreachable Redis is transient."""

    def __init__(self, client: redis.Redis, name: str, *, failure_threshold: int = 5, window_s: int = 30,
                 open_s: int = 10, trial_s: int = 30) -> None:
        self.r, self.name = client, name
        self.threshold, self.window_s, self.open_s, self.trial_s = failure_threshold, window_s, open_s, trial_s
        prefix = f"aios:circuit:{name}"
        self._fails, self._open = f"{prefix}:fails", f"{prefix}:open"
        self._tripped, self._trial = f"{prefix}:tripped", f"{prefix}:trial"

    def before_call(self) -> None:
        if redis_call(self.r.exists, self._open):
            raise CircuitOpen(f"circuit for connector {self.name} is open after repeated failures; "
                              f"retrying after {self.open_s}s")
        if redis_call(self.r.exists, self._tripped) and \
                not redis_call(self.r.set, self._trial, "1", nx=True, ex=self.trial_s):
            raise CircuitOpen(f"circuit for connector {self.name} is half-open: one trial call is in flight")

    def record(self, ok: bool) -> None:
        if ok:
            redis_call(self.r.delete, self._fails, self._tripped, self._trial)
            return
        if redis_call(self.r.exists, self._tripped):  # the trial call failed: open again at once
            self._trip()
            return
        pipe = self.r.pipeline()
        pipe.incr(self._fails)
        pipe.expire(self._fails, self.window_s)
        if redis_call(pipe.execute)[0] >= self.threshold:
            self._trip()

    def _trip(self) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._open, "1", ex=self.open_s)
        pipe.set(self._tripped, "1", ex=self.open_s + self.trial_s * 10)
        pipe.delete(self._fails, self._trial)
        redis_call(pipe.execute)

    def state(self) -> str:
        if redis_call(self.r.exists, self._open):
            return "open"
        return "half-open" if redis_call(self.r.exists, self._tripped) else "closed"


class HttpConnectors:
    """Every connector tool of a connectors file, as ``<connector>.<tool>``."""

    def __init__(self, client: redis.Redis, path: Path = CONNECTORS_FILE, *,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        raw = yaml.safe_load(path.read_text())
        amounts = parse_amount_fields(raw, str(path))
        self.amounts = amounts  # every amount declaration of the file, plug-in tools' included
        self.tools: dict[str, HttpTool] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.http: dict[str, httpx.Client] = {}
        self.max_bytes: dict[str, int] = {}
        self.rate_limits: dict[str, RateLimit] = {}
        for cname, conf in (raw.get("connectors") or {}).items():
            base = expand_env(str(conf.get("base_url", "")))
            if not base:
                raise ConfigError(f"{path}: connectors.{cname}.base_url is empty; set the environment variable it "
                                  "names (e.g. AIOS_SANDBOX_URL)")
            self.http[cname] = httpx.Client(base_url=base, timeout=conf.get("timeout_ms", 5000) / 1000,
                                            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
            self.breakers[cname] = CircuitBreaker(client, cname, **(conf.get("circuit") or {}))
            self.max_bytes[cname] = int(conf.get("max_response_bytes") or max_response_bytes)
            if conf.get("rate_limit"):
                self.rate_limits[cname] = _rate_limit(path, cname, conf["rate_limit"])
            for tname, tconf in (conf.get("tools") or {}).items():
                self.tools[f"{cname}.{tname}"] = HttpTool(cname, tname, tconf["method"].upper(), tconf["path"],
                                                          tuple(tconf.get("body") or ()),
                                                          amounts.get(f"{cname}.{tname}"),
                                                          _names(path, f"{cname}.{tname}", tconf.get("detokenize")),
                                                          _max_wait(path, f"{cname}.{tname}", tconf.get("max_wait_ms")))

    def call(self, tool_name: str, inputs: dict[str, Any], idempotency_key: str, timeout_s: float) -> Any:
        """One HTTP call; transient statuses and network errors count against the circuit."""
        tool = self.tools[tool_name]
        if tool.amount is not None:
            # The policy judged this input; a value it could not read was not allowed by an amount
            # rule, so it is not paid either (a permanent error: a retry sends the same value).
            _value, why = tool.amount.read(inputs)
            if why:
                raise InvalidArgument(f"{tool_name}: {why}; declared in connectors.yaml as its amount")
        path = _render_path(tool_name, tool.path, inputs)
        body = {k: inputs.get(k) for k in tool.body}
        breaker = self.breakers[tool.connector]
        breaker.before_call()
        try:
            with self.http[tool.connector].stream(
                    tool.method, path, json=body if tool.method != "GET" else None, timeout=timeout_s,
                    headers={"Idempotency-Key": idempotency_key} if tool.method != "GET" else {}) as resp:
                failed = resp.status_code in _TRANSIENT_STATUS or "retry-after" in resp.headers
                if failed or resp.status_code >= 400:
                    content, _ = _read(resp, _ERROR_BODY_BYTES)
                else:
                    content, over = _read(resp, self.max_bytes[tool.connector])
                    if over:
                        breaker.record(True)  # the API answered; the answer is too big for us
                        raise self._too_big(tool, resp)
        except httpx.HTTPError as exc:
            breaker.record(False)
            raise TransientError(f"{tool_name}: {type(exc).__name__}: {exc}") from exc
        text = content.decode("utf-8", "replace")
        # A Retry-After header (e.g. 409 "same key still in progress") means: come back later.
        if failed:
            breaker.record(False)
            raise TransientError(f"{tool_name}: HTTP {resp.status_code}: {text[:300]}")
        breaker.record(True)
        if resp.status_code >= 400:
            error = PermanentError(f"{tool_name}: HTTP {resp.status_code}: {text[:300]}")
            error.http_status = resp.status_code  # type: ignore[attr-defined]
            raise error
        try:
            return json.loads(content)
        except ValueError:
            return {"status_code": resp.status_code, "text": text[:1000]}

    def _too_big(self, tool: HttpTool, resp: httpx.Response) -> PermanentError:
        limit = self.max_bytes[tool.connector]
        declared = resp.headers.get("content-length")
        size = f" of {declared} bytes" if declared else ""
        return PermanentError(
            f"connector {tool.connector}, tool {tool.connector}.{tool.name}: the response body{size} exceeds the "
            f"{limit}-byte limit; the call was made (HTTP {resp.status_code}) but reading stopped at the limit. Raise "
            f"it with AIOS_EXECUTOR_MAX_RESPONSE_BYTES (every connector) or connectors.{tool.connector}."
            "max_response_bytes in services/executor/connectors.yaml")

    def close(self) -> None:
        for client in self.http.values():
            client.close()


def _names(path: Path, tool: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: connectors tool {tool}: detokenize must be a list of input names, got {value!r}")
    return tuple(value)


def _max_wait(path: Path, tool: str, value: Any) -> int | None:
    """A tool's own ``max_wait_ms`` for a rate-limit slot (None: its connector's)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: {tool}.max_wait_ms must be a whole number of ms >= 0 (0: fail at once when "
                          f"rate-limited), got {value!r}")
    return value


def _rate_limit(path: Path, cname: str, conf: Any) -> RateLimit:
    """``rate_limit: {per_second: 20, burst: 5, max_wait_ms: 2000}`` of one connector."""
    where = f"connectors.{cname}.rate_limit"
    if not isinstance(conf, dict) or set(conf) - {"per_second", "burst", "max_wait_ms"}:
        raise ConfigError(f"{path}: {where} takes per_second, burst and max_wait_ms, got {conf!r}")
    try:
        return RateLimit(float(conf["per_second"]), int(conf.get("burst", 1)), int(conf.get("max_wait_ms", 0)),
                         setting=f"{where} in {path.name}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {where}: per_second > 0 is required, burst >= 1 and max_wait_ms >= 0 "
                          f"(wait that long for a slot, 0 = fail at once and retry later): {exc}") from None


def _render_path(tool_name: str, template: str, inputs: dict[str, Any]) -> str:
    """The path with every parameter percent-encoded: an input like ``../admin`` or ``a/b?x=1`` stays one segment."""
    try:
        return template.format(**{k: quote(str(v), safe="") for k, v in inputs.items()})
    except KeyError as exc:
        raise InvalidArgument(f"{tool_name} needs input {exc.args[0]!r} for {template}") from None


def _read(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more (reading stops there)."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return b"", True
    chunks, size = [], 0
    for chunk in resp.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False
