"""Support triage through the whole mesh versus the model's own batched rate, on the same held-out
BANKING77 messages, in one run.

- the model alone, in this process: the bulk tier's model class (``TierModel``) with the tier's
  settings, every message in one model call, best of two: the rate the mesh is held to;
- the model through the service: the bulk tier over HTTP, 64 texts per request;
- the whole mesh: every message published as an upstream event, until every run is final (card
  blocks approved by a stand-in person). ``/v1/stats`` before and after shows which batch sizes
  actually reached the model while the mesh ran (the planner's classify requests, the bulk tier's
  model calls, the interactive tier's, and the embedding cache)."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from infra.stack import Stack
from services.common.inference_client import InferenceClient
from tools import triage
from tools.bench import burst_bench, inference_bench


def _accuracy(labels: list[str], messages: list[triage.Message]) -> float:
    return sum(lab == m.label for lab, m in zip(labels, messages, strict=True)) / len(messages)


def in_process(url: str, messages: list[triage.Message], rounds: int = 2) -> dict[str, Any]:
    """The model's own batched rate: the bulk tier's settings, every message in one model call."""
    spec = inference_bench.tier_specs(url)["high_throughput"]
    tier_model = inference_bench.tier_model_for(spec)
    texts = [m.text for m in messages]
    tier_model.run_blocking([texts[:32]])  # warm
    best, labels = 0.0, []
    for _ in range(rounds):
        started = time.perf_counter()
        [result] = tier_model.run_blocking([texts])
        best = max(best, len(texts) / (time.perf_counter() - started))
        labels = result["labels"]
    return {"messages_per_s": best, "accuracy": _accuracy(labels, messages),
            "method": f"in-process classify, all {len(texts)} messages in one model call, torch threads "
                      f"{spec['torch_threads']}, {inference_bench.priority_label(spec)} (the bulk tier's), "
                      f"best of {rounds}"}


def direct(url: str, messages: list[triage.Message]) -> dict[str, float]:
    """The model through the service: the bulk tier, 64 texts per request, one request at a time."""
    client = InferenceClient(url, timeout_s=120)
    client.classify([m.text for m in messages[:8]], "bulk")  # warm
    t0 = time.perf_counter()
    labels = []
    for start in range(0, len(messages), 64):
        labels += [p.label for p in client.classify([m.text for m in messages[start:start + 64]], "bulk").predictions]
    elapsed = time.perf_counter() - t0
    return {"messages_per_s": len(messages) / elapsed, "accuracy": _accuracy(labels, messages)}


def through_mesh(stack: Stack, messages: list[triage.Message], timeout_s: float = 300) -> dict[str, Any]:
    """Published as upstream events; until every run is final (card blocks approved by a stand-in person)."""
    with burst_bench.upstream(stack, "bench-approver") as (producer, watch):
        t0, t0_wall = time.monotonic(), time.time()
        sent = triage.publish(producer, messages, stack.tenant)
        # Read from Redis (run ids follow from event ids), not ListRuns: polling the planner for a
        # thousand runs five times a second loaded the process being measured.
        final = watch.wait_final(list(sent), timeout_s=timeout_s, poll_s=0.2)
        # The planner's own clock of the last end, not the polling's granularity.
        ends = [r.finished_at for r in final.values()]
        elapsed = (max(ends) / 1000 - t0_wall) if len(final) == len(messages) else time.monotonic() - t0
    runs = list(final.items())
    correct = sum(run.input.get("intent") == sent[event_id].label for event_id, run in runs)
    latencies = sorted(r.finished_at - r.created_at for _e, r in runs if r.finished_at)
    return {"messages_per_s": len(runs) / elapsed, "accuracy": correct / max(1, len(runs)),
            "finished": len(runs), "seconds": elapsed,
            "p50_run_ms": latencies[len(latencies) // 2] if latencies else 0.0,
            "how": "run ends read from Redis every 0.2 s; elapsed = publish to the planner's clock of the last end"}


def _stats(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/v1/stats", timeout=30).raise_for_status().json())


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What one stats block (BatchStats.snapshot) counted between two reads."""
    calls, texts = after["calls"] - before["calls"], after["texts"] - before["texts"]
    hist = {k: n - before["texts_per_call_histogram"].get(k, 0) for k, n in after["texts_per_call_histogram"].items()}
    return {"calls": calls, "texts": texts, "requests": after["requests"] - before["requests"],
            "mean_texts_per_call": round(texts / calls, 1) if calls else 0.0,
            "texts_per_call_histogram": {k: n for k, n in hist.items() if n},
            "seconds": round(after["seconds"] - before["seconds"], 2)}


def batches_seen(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Batch sizes that reached the service and the model while the mesh ran."""
    cache_a, cache_b = after["router"]["embedding_cache"], before["router"]["embedding_cache"]
    return {"bulk_requests": _delta(after["router"]["requests"]["high_throughput"],
                                    before["router"]["requests"]["high_throughput"]),
            "bulk_model_calls": _delta(after["tiers"]["high_throughput"], before["tiers"]["high_throughput"]),
            "interactive_requests": _delta(after["router"]["requests"]["low_latency"],
                                           before["router"]["requests"]["low_latency"]),
            "interactive_model_calls": _delta(after["tiers"]["low_latency"], before["tiers"]["low_latency"]),
            "embedding_cache_hits": cache_a["hits"] - cache_b["hits"],
            "embedding_cache_misses": cache_a["misses"] - cache_b["misses"]}


def run(stack: Stack, n: int = 300) -> dict[str, Any]:
    messages = triage.load_holdout(n, seed=29)
    url = stack.env()["AIOS_INFERENCE_URL"]
    # The machine is shared: the load beside each side of the ratio says how comparable they were.
    load = {"before_model": os.getloadavg()[0]}
    model = in_process(url, messages)
    served = direct(url, messages)
    before = _stats(url)
    load["before_mesh"] = os.getloadavg()[0]
    mesh = through_mesh(stack, messages)
    load["after_mesh"] = os.getloadavg()[0]
    seen = batches_seen(before, _stats(url))
    return {"messages": float(n), "mesh_messages_per_s": mesh["messages_per_s"], "mesh_accuracy": mesh["accuracy"],
            "mesh_p50_run_ms": mesh["p50_run_ms"], "mesh_finished": mesh["finished"],
            "model_direct_messages_per_s": served["messages_per_s"], "model_direct_accuracy": served["accuracy"],
            "model_in_process_messages_per_s": model["messages_per_s"],
            "model_in_process_accuracy": model["accuracy"], "model_in_process_method": model["method"],
            "mesh_over_model": mesh["messages_per_s"] / model["messages_per_s"],
            "same_accuracy": abs(mesh["accuracy"] - model["accuracy"]) < 1e-9, "inference_batches": seen,
            "load_average_1m": load}
