"""The tools an executor can run, by name.

A tool is a function ``(inputs, call) -> output`` (or ``ToolResult`` to report
cost and model). Register one with ``@tool("name")`` from
``services.executor.tools`` in a plug-in module named by
``AIOS_EXECUTOR_PLUGINS``; HTTP connectors from connectors.yaml are added as
``<connector>.<tool>``; the memory and reply tools are added by the
composition root."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.amounts import AmountField
from services.common.errors import InvalidArgument, PermanentError, TransientError
from services.common.pii_tokens import TokenVault, is_token, reseal

__all__ = ["BUILTIN", "Call", "Connectors", "Limiter", "ToolFn", "ToolResult", "Toolbox", "tool"]


@dataclass
class Call:
    """What a tool knows about the step it runs.

    ``idempotency_key`` is the step's key, ``<run id>:<step id>`` (compensations:
    ``<run id>:<step id>:compensate``): the SAME for every attempt of the step.
    A tool with an external effect must pass it to the third party (HTTP
    connectors send it as ``Idempotency-Key``) so that a retry after a timeout,
    a crash or a lost result takes effect once. ``attempt`` tells attempts
    apart; never build a dedupe key from it. ``timeout_s`` is the attempt's
    start-to-close bound, counted from when this call started."""

    tenant: str
    run_id: str
    step_id: str
    attempt: int
    idempotency_key: str
    latency_class: str
    timeout_s: float


@dataclass
class ToolResult:
    output: Any
    cost: float = 0.0
    model: str | None = None
    units: float = 1.0


ToolFn = Callable[[dict[str, Any], Call], Any]
BUILTIN: dict[str, ToolFn] = {}


def tool(name: str) -> Callable[[ToolFn], ToolFn]:
    """Register a Python tool under ``name`` (plug-ins: ``from services.executor.tools import tool``)."""
    def register(fn: ToolFn) -> ToolFn:
        BUILTIN[name] = fn
        return fn
    return register


@tool("noop")
def noop(inputs: dict[str, Any], call: Call) -> Any:
    """Does nothing, returns its inputs: measures the orchestration overhead."""
    return {"echo": inputs}


@tool("sleep")
def sleep(inputs: dict[str, Any], call: Call) -> Any:
    """Sleeps ``ms`` (at most the attempt's timeout)."""
    time.sleep(min(float(inputs.get("ms", 0)) / 1000, call.timeout_s))
    return {"slept_ms": inputs.get("ms", 0)}


@tool("fail")
def fail(inputs: dict[str, Any], call: Call) -> Any:
    """Fails on purpose (tests): transient for the first ``transient_attempts`` attempts, then succeeds."""
    if call.attempt <= int(inputs.get("transient_attempts", 0)):
        raise TransientError(f"planned transient failure on attempt {call.attempt}")
    if inputs.get("permanent"):
        raise PermanentError(str(inputs.get("message", "planned permanent failure")))
    return {"attempt": call.attempt}


@tool("charge")
def charge(inputs: dict[str, Any], call: Call) -> ToolResult:
    """Reports ``cost`` as what the call cost (tests and benchmarks of budgets): a metered call whether or
    not its step has an estimate, at, above or below it."""
    cost = float(inputs.get("cost", 0.0))
    return ToolResult({"charged": cost}, cost=cost)


class Connectors(Protocol):
    """HTTP connectors as the toolbox sees them."""

    @property
    def tools(self) -> Mapping[str, Any]: ...

    def call(self, tool_name: str, inputs: dict[str, Any], idempotency_key: str, timeout_s: float) -> Any: ...


class Limiter(Protocol):
    """Rate limits as the toolbox sees them (adapters.rate_limits.RateLimiter)."""

    def acquire(self, tenant: str, connector: str | None, timeout_s: float, *,
                max_wait_ms: int | None = None) -> float: ...


class Toolbox:
    """Every tool by name: registered functions (built-ins, plug-ins, memory, reply) and HTTP connectors.
    With a ``limiter``, every call first takes its tenant's (and connector's) rate-limit slot; the
    time it waited for it comes off the attempt's timeout."""

    def __init__(self, tools: Mapping[str, ToolFn] | None = None, connectors: Connectors | None = None, *,
                 limiter: Limiter | None = None, amounts: Mapping[str, AmountField] | None = None,
                 vault: TokenVault | None = None) -> None:
        self.tools: dict[str, ToolFn] = dict(BUILTIN)
        self.tools.update(tools or {})
        self.connectors = connectors
        self.limiter = limiter
        self.amounts = dict(amounts or {})  # plug-in tools' declared amount inputs (connectors.yaml `amounts:`)
        self.vault = vault

    def names(self) -> list[str]:
        return sorted([*self.tools, *(self.connectors.tools if self.connectors else ())])

    def run(self, name: str, inputs: Any, call: Call) -> ToolResult:
        """Run one tool call; its exceptions are the attempt's failure."""
        if not isinstance(inputs, dict):
            raise InvalidArgument(f"{name}: inputs must be an object, got {type(inputs).__name__}")
        connector_tool = self.connectors is not None and name in self.connectors.tools
        if self.limiter is not None and (connector_tool or name in self.tools):
            declared = self.connectors.tools[name] if connector_tool else None  # type: ignore[union-attr]
            waited = self.limiter.acquire(call.tenant, getattr(declared, "connector", None), call.timeout_s,
                                          max_wait_ms=getattr(declared, "max_wait_ms", None))
            if waited:
                call = dataclasses.replace(call, timeout_s=max(0.001, call.timeout_s - waited))
        if connector_tool:
            return self._call_connector(name, inputs, call)
        fn = self.tools.get(name)
        if fn is None:
            raise PermanentError(f"unknown tool {name!r}; this executor has: {', '.join(self.names())}")
        if name in self.amounts:
            # The policy judged this input; one it could not read was not allowed, so it is not paid.
            _value, why = self.amounts[name].read(inputs)
            if why:
                raise InvalidArgument(f"{name}: {why}; declared in connectors.yaml (amounts) as its amount")
        out = fn(inputs, call)
        return out if isinstance(out, ToolResult) else ToolResult(out)

    def _call_connector(self, name: str, inputs: dict[str, Any], call: Call) -> ToolResult:
        """The connector boundary: the tool's declared tokens are opened for this call's tenant only,
        and sealed again wherever the answer echoes them."""
        fields = getattr(self.connectors.tools[name], "detokenize", ())  # type: ignore[union-attr]
        opened: dict[str, str] = {}
        if fields and any(is_token(inputs.get(f)) for f in fields):
            if self.vault is None:
                raise PermanentError(f"{name} needs {', '.join(fields)} opened, but this executor has no PII key; "
                                     "set AIOS_PII_KEY_FILE to the key the policy service seals with")
            inputs, opened = self.vault.open_fields(call.tenant, inputs, fields)
        try:
            out = self.connectors.call(name, inputs, call.idempotency_key, call.timeout_s)  # type: ignore[union-attr]
        except Exception as exc:
            # An error quoting the request or the API's answer is a step result and a log line too.
            exc.args = tuple(reseal(a, opened) if isinstance(a, str) else a for a in exc.args)
            raise
        return ToolResult(reseal(out, opened))
