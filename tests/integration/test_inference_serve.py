"""The inference process end to end: ``python -m services.inference`` on fresh
ports with its own Ray cluster, driven over HTTP, then stopped with SIGTERM and
checked for leftover Ray processes. Starting Ray and two model replicas costs
~15-30 s on 2 cores, so one process serves the whole module. Tier settings
come from AIOS_INFERENCE_<TIER>_* (one set to a non-default value here); the
tests check that they reach the replicas, that concurrent bulk requests share
model calls, that the tiers run at their own CPU priority, and that an embed of
a just-classified text comes from the router's cache."""

from __future__ import annotations

import asyncio
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from services.common.inference_client import InferenceBadRequest, InferenceClient
from services.inference import model
from services.inference.cluster import PORT_SPAN, port_in_use, temp_dir_for

pytestmark = pytest.mark.integration
START_DEADLINE_S = 240.0
BULK_BATCH = 96  # AIOS_INFERENCE_HIGH_THROUGHPUT_MAX_BATCH_SIZE, not the default


@dataclass
class RunningInference:
    url: str
    proc: subprocess.Popen[bytes]
    ray_temp_dir: Path
    log: Path
    door: str = ""  # the low-latency tier's direct door


def _free_ray_base() -> int:
    """A random base whose whole port span is free, away from the defaults and
    below Linux's ephemeral range (32768+), where outgoing connections could
    take a worker port while the cluster runs."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(21000, 32768 - PORT_SPAN, PORT_SPAN)
        if not any(port_in_use(p) for p in range(base, base + PORT_SPAN)):
            return base
    raise RuntimeError("no free block of Ray ports found")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_classifier() -> None:
    if not model.classifier_path().exists():  # fitted once and cached (~1-2 min)
        subprocess.run([sys.executable, "-m", "services.inference.fit"], cwd=model.REPO, check=True, timeout=900)


def _leftovers(temp_dir: Path, pgid: int) -> list[str]:
    """Live processes naming the Ray temp dir, or still in the service's process group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and (str(temp_dir) in cmd or int(stat[2]) == pgid):
            found.append(f"{entry}: {cmd[:120]}")
    return found


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"inference exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"inference not healthy after {START_DEADLINE_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def inference() -> Iterator[RunningInference]:
    _ensure_classifier()
    run_dir = Path(tempfile.mkdtemp(prefix="aios-inf-", dir="/tmp"))  # short: Ray's socket paths
    base, port, door = _free_ray_base(), _free_port(), _free_port()
    env = {**os.environ, "AIOS_INFERENCE_HOST": "127.0.0.1", "AIOS_INFERENCE_PORT": str(port),
           "AIOS_INFERENCE_LOW_LATENCY_DIRECT_PORT": str(door),
           "AIOS_RAY_PORT_BASE": str(base), "AIOS_RUN_DIR": str(run_dir), "AIOS_LOG_FORMAT": "text",
           "AIOS_CACHE_DIR": str(model.cache_dir()), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "AIOS_INFERENCE_HIGH_THROUGHPUT_MAX_BATCH_SIZE": str(BULK_BATCH)}
    log = run_dir / "inference.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=model.REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = RunningInference(f"http://127.0.0.1:{port}", proc, temp_dir_for(run_dir, base), log,
                               f"http://127.0.0.1:{door}")
    try:
        _wait_healthy(running.url, proc, log)
        yield running
    finally:
        _stop_and_check(running)
        shutil.rmtree(run_dir, ignore_errors=True)


def _stop_and_check(running: RunningInference) -> None:
    proc = running.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError("inference did not stop within 30 s of SIGTERM") from None
    left = _leftovers(running.ray_temp_dir, proc.pid)
    for line in left:  # clean up by PID so one failure does not leak into later tests
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "Ray processes left after SIGTERM:\n" + "\n".join(left)
    assert proc.returncode == 0, running.log.read_text()[-3000:]
    assert "none left" in running.log.read_text()


@pytest.fixture(scope="module")
def holdout_sample() -> list[tuple[str, str]]:
    with model.holdout_path().open(newline="", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
    return rows[:: len(rows) // 20][:20]  # spread over all intents (the file is grouped by intent)


@pytest.fixture(scope="module")
def client(inference: RunningInference) -> Iterator[InferenceClient]:
    with InferenceClient(inference.url, timeout_s=60) as c:
        yield c


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("latency_class", "tier"), [("interactive", "low_latency"), ("bulk", "high_throughput")])
def test_classify_held_out_messages(client: InferenceClient, holdout_sample: list[tuple[str, str]],
                                    latency_class: str, tier: str) -> None:
    labels = set(client.models()["models"][0]["labels"])
    assert labels == _known_labels()
    result = client.classify([t for t, _ in holdout_sample], latency_class)
    assert result.tier == tier and result.model == model.CLASSIFIER_NAME and result.model_version
    assert len(result.predictions) == len(holdout_sample)
    assert all(p.label in labels and 0.0 < p.score <= 1.0 for p in result.predictions)
    correct = sum(p.label == want for p, (_, want) in zip(result.predictions, holdout_sample, strict=True))
    assert correct / len(holdout_sample) > 0.6


@pytest.mark.timeout(120)
def test_tiers_agree(client: InferenceClient, holdout_sample: list[tuple[str, str]]) -> None:
    texts = [t for t, _ in holdout_sample]
    fast = client.classify(texts, "interactive").predictions
    bulk = client.classify(texts, "bulk").predictions
    assert sum(a.label == b.label for a, b in zip(fast, bulk, strict=True)) >= 0.9 * len(texts)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("latency_class", ["interactive", "bulk"])
def test_embed_returns_unit_vectors(client: InferenceClient, latency_class: str) -> None:
    vectors = np.array(client.embed(["I lost my card", "How do I top up?", "x"], latency_class))
    assert vectors.shape == (3, model.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


@pytest.mark.timeout(60)
def test_bad_latency_class_is_400_with_the_accepted_values(inference: RunningInference) -> None:
    r = httpx.post(inference.url + "/v1/classify", json={"texts": ["hi"], "latency_class": "urgent"}, timeout=30)
    assert r.status_code == 400
    assert "interactive" in r.json()["error"] and "bulk" in r.json()["error"]


@pytest.mark.timeout(60)
def test_empty_texts_is_400(client: InferenceClient) -> None:
    with pytest.raises(InferenceBadRequest, match="empty") as err:
        client.embed([], "bulk")
    assert err.value.status_code == 400 and not err.value.retryable


@pytest.mark.timeout(60)
def test_health_and_registry(inference: RunningInference, client: InferenceClient) -> None:
    health = httpx.get(inference.url + "/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "tiers": ["low_latency", "high_throughput"]}
    registry = client.models()
    version = registry["models"][0]["versions"][0]["version"]
    assert registry["aliases"] == {"intent-classifier": f"{model.CLASSIFIER_NAME}@{version}",
                                   "embedder": model.EMBEDDER_NAME}
    assert all("cost_per_1k_texts" in m for m in registry["models"])
    assert set(registry["tiers"]) == {"low_latency", "high_throughput"}


def _stats(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/v1/stats", timeout=30).raise_for_status().json())


@pytest.mark.timeout(60)
def test_tier_settings_reach_the_replicas(client: InferenceClient) -> None:
    tiers = client.models()["tiers"]
    assert tiers["high_throughput"]["max_batch_size"] == BULK_BATCH
    assert tiers["high_throughput"]["latency_class"] == "bulk" and tiers["low_latency"]["batch_wait_ms"] == 0
    assert {t["device"] for t in tiers.values()} == {"auto"}


@pytest.mark.timeout(120)
def test_concurrent_bulk_requests_share_model_calls(inference: RunningInference,
                                                    holdout_sample: list[tuple[str, str]]) -> None:
    before = _stats(inference.url)["tiers"]["high_throughput"]

    async def send_all() -> list[int]:
        async with httpx.AsyncClient(base_url=inference.url, timeout=60) as http:
            replies = await asyncio.gather(*(http.post("/v1/classify", json={"texts": [t], "latency_class": "bulk"})
                                             for t, _ in holdout_sample * 2))
            return [r.status_code for r in replies]

    assert set(asyncio.run(send_all())) == {200}
    after = _stats(inference.url)["tiers"]["high_throughput"]
    requests, calls = after["requests"] - before["requests"], after["calls"] - before["calls"]
    assert requests == 2 * len(holdout_sample)
    assert calls < requests, f"{requests} concurrent requests ran in {calls} model calls: no batching"
    assert max(int(bucket[2:]) for bucket in after["texts_per_call_histogram"]) <= BULK_BATCH


@pytest.mark.timeout(120)
def test_an_embed_of_a_classified_text_comes_from_the_cache(inference: RunningInference,
                                                            client: InferenceClient) -> None:
    text = "Someone took money from my account without asking, what now?"
    client.classify([text], "bulk")
    before = _stats(inference.url)
    [cached] = client.embed([text], "interactive")
    after = _stats(inference.url)
    assert after["router"]["embedding_cache"]["hits"] == before["router"]["embedding_cache"]["hits"] + 1
    assert after["tiers"]["low_latency"]["texts"] == before["tiers"]["low_latency"]["texts"]  # no model call
    # The same tokens, computed now by the model (a trailing space is not a token): the same vector.
    [fresh] = client.embed([text + " "], "interactive")
    assert float(np.dot(cached, fresh)) > 0.9999


@pytest.mark.timeout(60)
def test_tiers_run_at_their_own_cpu_priority(inference: RunningInference) -> None:
    """Ray starts workers at nice 15 by default; here they start at 0, and only the bulk tier's
    model threads yield (nice 10), so the low-latency tier, and the proxy and router in front of
    it, go first on shared cores."""
    normal, bulk = (0, 0), (10, 0)  # (nice, scheduling policy; 0 is SCHED_OTHER)
    priorities = _thread_priorities(inference.proc.pid)
    assert set(priorities) == {"LowLatencyEncoder", "HighThroughputEncoder", "InferenceRouter", "ProxyActor"}
    for actor in ("LowLatencyEncoder", "InferenceRouter", "ProxyActor"):
        assert priorities[actor] == {normal}, actor
    assert priorities["HighThroughputEncoder"] == {normal, bulk}


def _thread_priorities(service_pid: int) -> dict[str, set[tuple[int, int]]]:
    """(nice, policy) of the threads of each Ray actor the service started (its descendants)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit():
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        except (OSError, IndexError):
            continue
    found: dict[str, set[tuple[int, int]]] = {}
    stack = [service_pid]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            name = next((n for n in ("LowLatencyEncoder", "HighThroughputEncoder", "InferenceRouter", "ProxyActor")
                         if n in cmd), None)
            for task in os.listdir(f"/proc/{pid}/task") if name else []:
                stat = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(") ", 1)[1].split()
                found.setdefault(str(name), set()).add((int(stat[16]), int(stat[38])))
        except OSError:
            continue
    return found


def _known_labels() -> set[str]:
    with model.holdout_path().open(newline="", encoding="utf-8") as fh:
        return {r["category"] for r in csv.DictReader(fh)}


@pytest.mark.timeout(120)
def test_the_low_latency_replica_answers_at_its_own_door_as_the_router_does(
        inference: RunningInference, holdout_sample: list[tuple[str, str]]) -> None:
    """The door is served by the Serve replica itself (same model, same version, same labels),
    counted in the tier's statistics, and refuses bulk calls, which belong to the router."""
    texts = [text for text, _ in holdout_sample[:6]]
    before = _stats(inference.url)["tiers"]["low_latency"]["requests"]
    via_router = httpx.post(inference.url + "/v1/classify", json={"texts": texts, "latency_class": "interactive"},
                            timeout=30).raise_for_status().json()
    direct = httpx.post(inference.door + "/v1/classify", json={"texts": texts, "latency_class": "interactive"},
                        timeout=30).raise_for_status().json()
    assert [p["label"] for p in direct["predictions"]] == [p["label"] for p in via_router["predictions"]]
    assert direct["model_version"] == via_router["model_version"] and direct["tier"] == "low_latency"
    assert _stats(inference.url)["tiers"]["low_latency"]["requests"] >= before + 2
    bulk = httpx.post(inference.door + "/v1/classify", json={"texts": texts, "latency_class": "bulk"}, timeout=30)
    assert bulk.status_code == 421 and "router" in bulk.json()["error"]
    tiers = httpx.get(inference.url + "/v1/models", timeout=30).raise_for_status().json()["tiers"]
    assert tiers["low_latency"]["direct_port"] == int(inference.door.rsplit(":", 1)[1])
    assert tiers["high_throughput"]["direct_port"] == 0
    with InferenceClient(inference.url, timeout_s=30, interactive_url=inference.door) as client:
        assert [p.label for p in client.classify(texts).predictions] == [p["label"] for p in direct["predictions"]]
        assert client.door_fallbacks == 0
