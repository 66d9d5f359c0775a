"""The tools the executor can run. A tool is a function
``(inputs, call) -> output``; HTTP connectors from connectors.yaml are added
as tools named ``<connector>.<tool>``. Register a Python tool with
``@tool("name")`` in this module or in a plug-in module named by
AIOS_EXECUTOR_PLUGINS."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from aiosmesh.v1 import memory_pb2, memory_pb2_grpc
from services.common.errors import InvalidArgument, PermanentError, TransientError
from services.common.grpc_server import channel, trace_metadata
from services.executor.connectors import HttpConnectors
from services.executor.generator import ReplyGenerator


@dataclass
class Call:
    """What a tool knows about the step it runs."""

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
_BUILTIN: dict[str, ToolFn] = {}


def tool(name: str) -> Callable[[ToolFn], ToolFn]:
    def register(fn: ToolFn) -> ToolFn:
        _BUILTIN[name] = fn
        return fn
    return register


@tool("noop")
def noop(inputs: dict[str, Any], call: Call) -> Any:
    """Does nothing, returns its inputs: measures the orchestration overhead."""
    return {"echo": inputs}


@tool("sleep")
def sleep(inputs: dict[str, Any], call: Call) -> Any:
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


class Toolbox:
    """Every tool by name: built-ins, memory and reply tools, HTTP connectors."""

    def __init__(self, connectors: HttpConnectors, memory_addr: str, generator: ReplyGenerator) -> None:
        self.connectors = connectors
        self.generator = generator
        self._memory = memory_pb2_grpc.MemoryServiceStub(channel(memory_addr))
        self.tools: dict[str, ToolFn] = dict(_BUILTIN)
        self.tools.update({"memory.recall": self.memory_recall, "memory.get_fact": self.memory_get_fact,
                           "memory.put_fact": self.memory_put_fact, "reply.draft": self.reply_draft})

    def names(self) -> list[str]:
        return sorted([*self.tools, *self.connectors.tools])

    def run(self, name: str, inputs: Any, call: Call) -> ToolResult:
        if not isinstance(inputs, dict):
            raise InvalidArgument(f"{name}: inputs must be an object, got {type(inputs).__name__}")
        if name in self.connectors.tools:
            return ToolResult(self.connectors.call(name, inputs, call.idempotency_key, call.timeout_s))
        fn = self.tools.get(name)
        if fn is None:
            raise PermanentError(f"unknown tool {name!r}; this executor has: {', '.join(self.names())}")
        out = fn(inputs, call)
        return out if isinstance(out, ToolResult) else ToolResult(out)

    def _grpc(self, method: str, request: Any, call: Call) -> Any:
        try:
            return getattr(self._memory, method)(request, timeout=call.timeout_s, metadata=trace_metadata())
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TransientError(f"memory {method}: {code.name}") from exc
            raise PermanentError(f"memory {method}: {code.name}: {exc.details()}") from exc  # type: ignore[attr-defined]

    def memory_recall(self, inputs: dict[str, Any], call: Call) -> Any:
        resp = self._grpc("Recall", memory_pb2.RecallRequest(
            tenant=call.tenant, collection=str(inputs.get("collection", "kb")), query=str(inputs.get("query", "")),
            k=int(inputs.get("k", 3)), latency_class=call.latency_class), call)
        items = [{"id": i.id, "text": i.text, "score": round(i.score, 4),
                  "metadata": json.loads(i.metadata_json or "{}")} for i in resp.items]
        return ToolResult({"items": items, "embedding_model": resp.embedding_model}, model=resp.embedding_model)

    def memory_get_fact(self, inputs: dict[str, Any], call: Call) -> Any:
        fact = self._grpc("GetFact", memory_pb2.GetFactRequest(tenant=call.tenant, key=str(inputs["key"])), call)
        return {"key": fact.key, "value": json.loads(fact.value_json or "null"), "version": fact.version}

    def memory_put_fact(self, inputs: dict[str, Any], call: Call) -> Any:
        fact = self._grpc("PutFact", memory_pb2.PutFactRequest(
            tenant=call.tenant, key=str(inputs["key"]), value_json=json.dumps(inputs.get("value")),
            expected_version=int(inputs.get("expected_version", -1)),
            provenance_json=json.dumps({"run_id": call.run_id, "step_id": call.step_id})), call)
        return {"key": fact.key, "version": fact.version}

    def reply_draft(self, inputs: dict[str, Any], call: Call) -> Any:
        articles = inputs.get("articles") or []
        if isinstance(articles, dict):
            articles = articles.get("items", [])
        draft = self.generator.draft(str(inputs.get("message", "")), list(articles), inputs.get("customer_id"))
        return ToolResult(draft, model=draft.get("generator"))
