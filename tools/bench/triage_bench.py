"""Support triage through the whole mesh versus calling the model directly,
on the same held-out BANKING77 messages."""

from __future__ import annotations

import json
import time
from typing import Any

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.inference_client import InferenceClient
from services.common.kafka import ConsumerLoop, MeshProducer
from tools import triage
from tools.demo import FINAL, Approver


def direct(url: str, messages: list[triage.Message]) -> dict[str, float]:
    """The model alone: the inference service's bulk tier, 64 texts per call."""
    client = InferenceClient(url, timeout_s=120)
    client.classify([m.text for m in messages[:8]], "bulk")  # warm
    t0 = time.perf_counter()
    labels = []
    for start in range(0, len(messages), 64):
        labels += [p.label for p in client.classify([m.text for m in messages[start:start + 64]], "bulk").predictions]
    elapsed = time.perf_counter() - t0
    return {"messages_per_s": len(messages) / elapsed,
            "accuracy": sum(lab == m.label for lab, m in zip(labels, messages, strict=True)) / len(messages)}


def through_mesh(stack: Stack, messages: list[triage.Message], timeout_s: float = 300) -> dict[str, Any]:
    """Published as upstream events; until every run is final (card blocks approved by a stand-in person)."""
    env = stack.env()
    catalog = Catalog(stack.topic_prefix)
    codec = AvroCodec(catalog.schemas)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))
    approvals = ConsumerLoop(service="bench-approver", group=stack.topic_prefix + "bench-approver",
                             roles=["approvals"], handler=Approver(stub, stack.tenant),
                             bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog, codec=codec,
                             producer=producer).start()
    try:
        t0 = time.monotonic()
        sent = triage.publish(producer, messages, stack.tenant)
        runs: list[workflow_pb2.Run] = []
        while time.monotonic() - t0 < timeout_s:
            listed = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=stack.tenant, limit=1000), timeout=10).runs
            runs = [r for r in listed if json.loads(r.input_json).get("event", {}).get("id") in sent]
            if len(runs) == len(messages) and all(r.status in FINAL for r in runs):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
    finally:
        approvals.stop()
    correct = sum(json.loads(r.input_json).get("intent") == sent[json.loads(r.input_json)["event"]["id"]].label
                  for r in runs)
    latencies = sorted(r.finished_at_ms - r.created_at_ms for r in runs if r.finished_at_ms)
    return {"messages_per_s": len(runs) / elapsed, "accuracy": correct / max(1, len(runs)),
            "finished": sum(r.status in FINAL for r in runs), "p50_run_ms": latencies[len(latencies) // 2]
            if latencies else 0.0}


def run(stack: Stack, n: int = 300) -> dict[str, float]:
    messages = triage.load_holdout(n, seed=29)
    model = direct(stack.env()["AIOS_INFERENCE_URL"], messages)
    mesh = through_mesh(stack, messages)
    return {"messages": float(n), "mesh_messages_per_s": mesh["messages_per_s"], "mesh_accuracy": mesh["accuracy"],
            "mesh_p50_run_ms": mesh["p50_run_ms"], "model_direct_messages_per_s": model["messages_per_s"],
            "model_direct_accuracy": model["accuracy"]}
