"""The memory and reply tools: the memory service over gRPC, and the reply generator."""

from __future__ import annotations

import json
from typing import Any

import grpc

from aiosmesh.v1 import memory_pb2, memory_pb2_grpc
from services.common.errors import PermanentError, TransientError
from services.common.grpc_server import channel, trace_metadata
from services.executor.adapters.generator import ReplyGenerator
from services.executor.adapters.toolbox import Call, ToolFn, ToolResult

__all__ = ["MemoryTools", "reply_tools"]


class MemoryTools:
    """``memory.recall``, ``memory.get_fact``, ``memory.put_fact`` through the memory service's gRPC API."""

    def __init__(self, address: str) -> None:
        self._stub = memory_pb2_grpc.MemoryServiceStub(channel(address))  # connects lazily

    def tools(self) -> dict[str, ToolFn]:
        return {"memory.recall": self.recall, "memory.get_fact": self.get_fact, "memory.put_fact": self.put_fact}

    def _grpc(self, method: str, request: Any, call: Call) -> Any:
        try:
            # wait_for_ready: while the memory service restarts, the call waits (within its timeout)
            # for it to be back instead of failing at once and burning one of the step's attempts.
            return getattr(self._stub, method)(request, timeout=call.timeout_s, metadata=trace_metadata(),
                                               wait_for_ready=True)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TransientError(f"memory {method}: {code.name}") from exc
            raise PermanentError(f"memory {method}: {code.name}: {exc.details()}") from exc

    def recall(self, inputs: dict[str, Any], call: Call) -> Any:
        resp = self._grpc("Recall", memory_pb2.RecallRequest(
            tenant=call.tenant, collection=str(inputs.get("collection", "kb")), query=str(inputs.get("query", "")),
            k=int(inputs.get("k", 3)), latency_class=call.latency_class), call)
        items = [{"id": i.id, "text": i.text, "score": round(i.score, 4),
                  "metadata": json.loads(i.metadata_json or "{}")} for i in resp.items]
        return ToolResult({"items": items, "embedding_model": resp.embedding_model}, model=resp.embedding_model)

    def get_fact(self, inputs: dict[str, Any], call: Call) -> Any:
        fact = self._grpc("GetFact", memory_pb2.GetFactRequest(tenant=call.tenant, key=str(inputs["key"])), call)
        return {"key": fact.key, "value": json.loads(fact.value_json or "null"), "version": fact.version}

    def put_fact(self, inputs: dict[str, Any], call: Call) -> Any:
        fact = self._grpc("PutFact", memory_pb2.PutFactRequest(
            tenant=call.tenant, key=str(inputs["key"]), value_json=json.dumps(inputs.get("value")),
            expected_version=int(inputs.get("expected_version", -1)),
            provenance_json=json.dumps({"run_id": call.run_id, "step_id": call.step_id})), call)
        return {"key": fact.key, "version": fact.version}


def reply_tools(generator: ReplyGenerator) -> dict[str, ToolFn]:
    """``reply.draft``: a reply from recalled articles, by the configured generator."""
    def reply_draft(inputs: dict[str, Any], call: Call) -> Any:
        articles = inputs.get("articles") or []
        if isinstance(articles, dict):
            articles = articles.get("items", [])
        draft = generator.draft(str(inputs.get("message", "")), list(articles), inputs.get("customer_id"))
        return ToolResult(draft, model=draft.get("generator"))
    return {"reply.draft": reply_draft}
