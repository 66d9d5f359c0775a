"""The Ray Serve application: two tiers of the same model behind a router.

- ``LowLatencyEncoder`` (``latency_class="interactive"``): never waits to fill a
  batch and keeps batches small, so an interactive request never queues behind
  a big one; its model thread runs at normal CPU priority.
- ``HighThroughputEncoder`` (``"bulk"``): ``@serve.batch`` packs the texts of
  concurrent calls into one model call (up to ``max_batch_size`` texts, waiting
  at most ``batch_wait_ms`` for more); requests that wait while the model is
  busy run merged in the next model call; its model thread yields the CPU
  (nice 10), so where the tiers share cores the low-latency tier goes first.
- ``InferenceRouter``: the HTTP ingress; validates, picks the tier, splits a
  request into calls of at most the tier's batch size, and keeps the embedding
  cache (``cache``) that lets an embed of a just-classified text skip the model.

Everything a tier needs (device, replicas, CPU/GPU share, torch threads,
batching) is a ``TierSpec`` (``tiers``): ``build_app`` applies it as Serve
deployment options and hands it to the replicas. A replica given a GPU encodes
on it; nothing else changes between a CPU box and a GPU pool.

``python -m services.inference`` deploys ``build_app`` on a private Ray;
KubeRay deploys ``app_builder`` from a Serve config (``serveConfigV2``), whose
``deployments`` entries override the options set here."""

# No ``from __future__ import annotations`` here: FastAPI must see the real
# ``Request`` annotation on the ingress methods, or it treats it as a query field.
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from services.common.tracing import configure_tracing
from services.inference import contract, model, spans
from services.inference.cache import EmbeddingCache
from services.inference.direct import DirectDoor
from services.inference.encoder import BatchStats, TierModel
from services.inference.tiers import DEFAULT_CACHE_ITEMS, DEFAULT_TIERS, TIER_NAMES, TierSpec, with_overrides

log = logging.getLogger("aios.inference")
# Replicas stop quickly: the process owning the cluster has ~15 s to shut down.
_GRACE: dict[str, Any] = {"graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}
_LL, _HT = DEFAULT_TIERS["low_latency"], DEFAULT_TIERS["high_throughput"]
# Serve forms a batch as soon as its wait ends, whether or not the model is free,
# and runs at most max_concurrent_batches at once. Handing several over lets the
# batches formed while the model is busy meet in TierModel's queue and run as one
# model call; with 1, each would wait its turn and run alone, small (measured:
# 362 of 527 model calls carried one text, for 32 concurrent one-text callers).
# Serve asks for max_ongoing_requests >= max_batch_size x this (the tiers' specs
# meet it); its batch metrics (ray_serve_batch_*) feed the inference dashboard.
HANDOVER = 4


def _texts_in(calls: list[list[str]]) -> int:
    """The batcher counts texts, not calls, so a model call never exceeds max_batch_size texts."""
    return sum(len(texts) for texts in calls)


class _EncoderTier:
    """One replica of a tier: the model on its own thread, batches from ``infer``."""

    tier = ""

    def __init__(self, classifier_path: str, torch_threads: int, spec: dict[str, Any] | None = None) -> None:
        # A replica is a process of its own: OTEL_* (or AIOS_OTLP_ENDPOINT) come from the raylet or the pod.
        configure_tracing("inference", os.environ.get("AIOS_OTLP_ENDPOINT", ""))
        self.spec = TierSpec.model_validate(spec) if spec is not None else DEFAULT_TIERS[self.tier]
        batched: Any = type(self).infer  # type: ignore[attr-defined]
        batched.set_max_batch_size(self.spec.max_batch_size)
        batched.set_batch_wait_timeout_s(self.spec.batch_wait_ms / 1000)
        self.torch_threads = torch_threads
        self.model = TierModel(Path(classifier_path), threads=torch_threads, device=self.spec.device,
                               encode_batch_size=min(self.spec.encode_batch_size, self.spec.max_batch_size),
                               max_texts=self.spec.max_batch_size, nice=self.spec.nice,
                               sched_idle=self.spec.sched_idle, name=self.tier)
        log.info("tier %s ready on %s with %s@%s (%d torch threads, batches <= %d texts, wait %.1f ms, %s)",
                 self.tier, self.model.device, model.CLASSIFIER_NAME, self.model.classifier.version, torch_threads,
                 self.spec.max_batch_size, self.spec.batch_wait_ms,
                 "SCHED_IDLE" if self.spec.sched_idle else f"nice {self.spec.nice}")
        self.door = self._open_door()

    def _open_door(self) -> DirectDoor | None:
        """The tier's own door (services/inference/direct.py), opened once the model is warm. A port
        that cannot be bound leaves the tier without one: callers fall back to the router."""
        if not self.spec.direct_port:
            return None
        try:
            return DirectDoor(self.tier, self.model.run_blocking, host=self.spec.direct_host,
                              port=self.spec.direct_port, max_batch_size=self.spec.max_batch_size,
                              max_ongoing=self.spec.max_ongoing_requests, record=self.model.stats.record).start()
        except OSError as exc:
            log.error("tier %s: cannot open its direct door on %s:%d (%s); interactive calls go through "
                      "the router", self.tier, self.spec.direct_host, self.spec.direct_port, exc)
            return None

    def __del__(self) -> None:
        door = getattr(self, "door", None)
        if door is not None:
            door.close()

    def ping(self) -> str:
        return self.tier

    def info(self) -> dict[str, Any]:
        return {"tier": self.tier, **self.model.info(),
                "spec": {**self.spec.model_dump(), "torch_threads": self.torch_threads}}

    def stats(self) -> dict[str, Any]:
        return {"tier": self.tier, **self.model.stats.snapshot()}

    async def _infer(self, calls: list[list[str]], contexts: list[dict[str, str]]) -> list[dict[str, Any]]:
        """The model call for a Serve batch, and a span per call in its caller's trace."""
        started = time.time_ns()
        results = await self.model.infer(calls)
        spans.model_call_spans(self.tier, calls, contexts, results, started, time.time_ns())
        return results


@serve.deployment(**_LL.actor_options(), **_GRACE)
class LowLatencyEncoder(_EncoderTier):
    tier = "low_latency"

    @serve.batch(max_batch_size=_LL.max_batch_size, batch_wait_timeout_s=_LL.batch_wait_ms / 1000,
                 batch_size_fn=_texts_in, max_concurrent_batches=HANDOVER)
    async def infer(self, calls: list[list[str]], contexts: list[dict[str, str]]) -> list[dict[str, Any]]:
        return await self._infer(calls, contexts)


@serve.deployment(**_HT.actor_options(), **_GRACE)
class HighThroughputEncoder(_EncoderTier):
    tier = "high_throughput"

    @serve.batch(max_batch_size=_HT.max_batch_size, batch_wait_timeout_s=_HT.batch_wait_ms / 1000,
                 batch_size_fn=_texts_in, max_concurrent_batches=HANDOVER)
    async def infer(self, calls: list[list[str]], contexts: list[dict[str, str]]) -> list[dict[str, Any]]:
        return await self._infer(calls, contexts)


api = FastAPI(title="AIOS mesh inference", version="1")


_Outputs = tuple[list[str], list[float], np.ndarray, str]  # labels, scores, vectors, classifier version


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _bounded(response: Any, timeout_s: float) -> Any:
    """Await a DeploymentResponse with a deadline, cancelling it on timeout."""
    async def wait() -> Any:
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        response.cancel()
        raise


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1}, **_GRACE)
@serve.ingress(api)
class InferenceRouter:
    """HTTP edge: validation, tier choice, fan-out, the embedding cache and the model registry."""

    def __init__(self, low_latency: DeploymentHandle[Any], high_throughput: DeploymentHandle[Any],
                 cost_per_1k_texts: float = 0.0, request_timeout_s: float = 30.0, *,
                 tier_specs: dict[str, dict[str, Any]] | None = None,
                 embedding_cache_size: int = DEFAULT_CACHE_ITEMS) -> None:
        self.tiers = {"low_latency": low_latency, "high_throughput": high_throughput}
        self.specs = ({name: TierSpec.model_validate(tier_specs[name]) for name in TIER_NAMES} if tier_specs
                      else dict(DEFAULT_TIERS))
        self.cost_per_1k_texts = cost_per_1k_texts
        self.request_timeout_s = request_timeout_s
        self.cache = EmbeddingCache(embedding_cache_size)
        self.requests = {name: BatchStats() for name in TIER_NAMES}  # what callers send, per tier
        self._tier_info: dict[str, dict[str, Any]] = {}
        configure_tracing("inference", os.environ.get("AIOS_OTLP_ENDPOINT", ""))

    async def _parse(self, request: Request) -> contract.InferenceRequest:
        return contract.parse_body(await request.body())

    async def _run(self, tier: str, texts: list[str], timing: dict[str, float], op: str = "classify") -> _Outputs:
        """Labels, scores, vectors and classifier version for ``texts``, in calls of at most the tier's
        batch; adds where the time went to ``timing`` (the slowest call's, for Server-Timing). Each call
        carries the request span's trace context (a Serve call carries none of its own)."""
        size = self.specs[tier].max_batch_size
        handle = self.tiers[tier]
        started = time.perf_counter()
        context = spans.call_context(op)
        calls = [handle.infer.remote(texts[i:i + size], context) for i in range(0, len(texts), size)]
        results = await asyncio.wait_for(asyncio.gather(*calls), self.request_timeout_s)
        elapsed = time.perf_counter() - started
        self.requests[tier].record(1, len(texts), elapsed)
        timing.update({"tier": elapsed * 1000, "queue": max(r.get("queue_ms", 0.0) for r in results),
                       "model": max(r.get("model_ms", 0.0) for r in results)})
        vectors = np.concatenate([r["vectors"] for r in results]) if len(results) > 1 else results[0]["vectors"]
        self.cache.put_many(texts, vectors)
        return ([label for r in results for label in r["labels"]], [s for r in results for s in r["scores"]],
                vectors, results[0]["version"])

    async def _classify(self, parsed: contract.InferenceRequest, timing: dict[str, float]) -> dict[str, Any]:
        labels, scores, _, version = await self._run(parsed.tier, parsed.texts, timing)
        spans.describe(trace.get_current_span(), "classify", parsed.tier, parsed.latency_class, len(parsed.texts),
                       response_model=spans.response_model("classify", version))
        return model.classify_answer(labels, scores, version, parsed.tier)

    async def _embed(self, parsed: contract.InferenceRequest, timing: dict[str, float]) -> dict[str, Any]:
        vectors: list[np.ndarray | None] = [self.cache.get(text) for text in parsed.texts]
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            _, _, computed, _ = await self._run(parsed.tier, [parsed.texts[i] for i in missing], timing, "embed")
            for i, vector in zip(missing, computed, strict=True):
                vectors[i] = vector
        spans.describe(trace.get_current_span(), "embed", parsed.tier, parsed.latency_class, len(parsed.texts),
                       response_model=spans.response_model("embed", ""), computed=len(missing))
        return model.embed_answer([v for v in vectors if v is not None], parsed.tier)

    async def _answer(self, request: Request, op: str) -> JSONResponse:
        with spans.request_span(op, request.headers) as span:
            response = await self._respond(request, op)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(trace.StatusCode.ERROR, f"HTTP {response.status_code}")
            return response

    async def _respond(self, request: Request, op: str) -> JSONResponse:
        started, timing = time.perf_counter(), dict[str, float]()
        try:
            parsed = await self._parse(request)
            body = await (self._classify(parsed, timing) if op == "classify" else self._embed(parsed, timing))
            # Server-Timing (W3C): where this request's time went inside the service, so a
            # client can tell the model's share from the serving path's.
            timing["router"] = (time.perf_counter() - started) * 1000
            return JSONResponse(body, headers={"Server-Timing": ", ".join(
                f"{name};dur={ms:.2f}" for name, ms in timing.items())})
        except contract.BadInput as exc:
            return _error(400, str(exc))
        except TimeoutError:
            return _error(503, f"inference timed out after {self.request_timeout_s}s; retry later")
        except Exception as exc:  # a tier died or is restarting: retryable for the caller
            log.exception("inference %s failed", op)
            return _error(503, f"inference tier unavailable ({type(exc).__name__}); retry later")

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        return await self._answer(request, "classify")

    @api.post("/v1/embed")
    async def embed(self, request: Request) -> JSONResponse:
        return await self._answer(request, "embed")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        async def answers(name: str) -> bool:
            try:
                return bool(await _bounded(self.tiers[name].ping.remote(), 2.0) == name)
            except Exception:
                return False

        ok = await asyncio.gather(*(answers(name) for name in contract.TIERS))
        if all(ok):
            return JSONResponse({"status": "ok", "tiers": list(contract.TIERS)})
        down = [name for name, up in zip(contract.TIERS, ok, strict=True) if not up]
        return JSONResponse({"status": "unavailable", "tiers": [n for n in contract.TIERS if n not in down],
                             "down": down}, status_code=503)

    @api.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        """Texts per request reaching the router and per model call reaching each tier (counted by the
        replica that answers: the whole tier when it has one), and the embedding cache."""
        try:
            tiers = {name: await _bounded(self.tiers[name].stats.remote(), 5.0) for name in contract.TIERS}
        except Exception as exc:
            return _error(503, f"tier stats unavailable ({type(exc).__name__}); retry later")
        return JSONResponse({"tiers": tiers, "router": {
            "requests": {name: stats.snapshot() for name, stats in self.requests.items()},
            "embedding_cache": self.cache.snapshot()}})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            for name in contract.TIERS:
                if name not in self._tier_info:
                    self._tier_info[name] = await _bounded(self.tiers[name].info.remote(), 5.0)
        except Exception as exc:
            return _error(503, f"model registry unavailable ({type(exc).__name__}); retry later")
        return JSONResponse(self._registry())

    def _registry(self) -> dict[str, Any]:
        ll = self._tier_info["low_latency"]
        version = ll["classifier_version"]
        # Each model lists its versions with a traffic weight: the place a
        # canary version would appear with weight < 1.
        tiers = list(contract.TIERS)
        return {
            "aliases": {"intent-classifier": f"{model.CLASSIFIER_NAME}@{version}",
                        "embedder": model.EMBEDDER_NAME},
            "models": [
                {"name": model.CLASSIFIER_NAME, "kind": "intent-classifier",
                 "versions": [{"version": info["classifier_version"], "tier": name, "weight": 1.0}
                              for name, info in self._tier_info.items()],
                 "labels": ll["labels"], "holdout_accuracy": ll["classifier_meta"].get("holdout_accuracy"),
                 "fitted_at": ll["classifier_meta"].get("fitted_at"),
                 "cost_per_1k_texts": self.cost_per_1k_texts, "tiers": tiers},
                {"name": model.EMBEDDER_NAME, "kind": "embedder", "dim": model.EMBEDDING_DIM,
                 "versions": [{"version": ll["embedder_version"], "tier": name, "weight": 1.0} for name in tiers],
                 "cost_per_1k_texts": self.cost_per_1k_texts, "tiers": tiers},
            ],
            "tiers": {name: {"latency_class": next(c for c, t in contract.TIERS_BY_LATENCY_CLASS.items() if t == name),
                             "device": info.get("device"), **info.get("spec", {})}
                      for name, info in self._tier_info.items()},
        }


def build_app(classifier_path: Path, *, torch_threads: int = 2, cost_per_1k_texts: float = 0.0,
              tiers: dict[str, TierSpec] | None = None, embedding_cache_size: int = DEFAULT_CACHE_ITEMS) -> Any:
    """The bound application graph, ready for ``serve.run``; ``tiers`` defaults to ``DEFAULT_TIERS``."""
    specs = tiers or DEFAULT_TIERS
    ll, ht = specs["low_latency"], specs["high_throughput"]
    # serve.deployment returns a Deployment; mypy only sees the class.
    low = LowLatencyEncoder.options(**ll.actor_options()).bind(  # type: ignore[attr-defined]
        str(classifier_path), ll.threads(torch_threads), spec=ll.model_dump())
    high = HighThroughputEncoder.options(**ht.actor_options()).bind(  # type: ignore[attr-defined]
        str(classifier_path), ht.threads(torch_threads), spec=ht.model_dump())
    return InferenceRouter.bind(low, high, cost_per_1k_texts,  # type: ignore[attr-defined]
                                tier_specs={name: spec.model_dump() for name, spec in specs.items()},
                                embedding_cache_size=embedding_cache_size)


class AppArgs(BaseModel):
    """The ``args`` of the application in a Serve config (KubeRay ``serveConfigV2``); Serve validates
    them against this model, so a misspelt or out-of-range argument fails the deploy, naming it.
    ``low_latency`` / ``high_throughput`` take ``TierSpec`` fields (device, max_batch_size, ...);
    the config's ``deployments`` entries still decide replicas and CPU/GPU resources."""

    model_config = ConfigDict(extra="forbid")

    torch_threads: int = Field(2, ge=1, le=64, description="torch threads per model replica")
    cost_per_1k_texts: float = Field(0.0, ge=0.0, description="reported by /v1/models")
    embedding_cache_size: int = Field(DEFAULT_CACHE_ITEMS, ge=0, le=1_000_000,
                                      description="texts whose vectors the router keeps; 0 turns the cache off")
    low_latency: dict[str, Any] = Field(default_factory=dict, description="TierSpec fields for the low-latency tier")
    high_throughput: dict[str, Any] = Field(default_factory=dict,
                                            description="TierSpec fields for the high-throughput tier")

    @model_validator(mode="after")
    def _tiers_valid(self) -> "AppArgs":
        self.tier_specs()
        return self

    def tier_specs(self) -> dict[str, TierSpec]:
        try:
            return with_overrides({"low_latency": self.low_latency, "high_throughput": self.high_throughput})
        except ValueError as exc:  # pydantic's ValidationError included: name the arg it came from
            raise ValueError(f"low_latency/high_throughput args: {exc}") from None


def app_builder(args: AppArgs) -> Any:
    """Serve's application builder for config-file deployments (``import_path:
    services.inference.app:app_builder``), as KubeRay runs it. The classifier comes from
    AIOS_CACHE_DIR (baked into the inference image). The embedded stack does not come
    through here: ``main`` starts its own Ray and calls ``build_app``."""
    path = model.classifier_path()
    if not path.exists():  # fail the deploy here, not every replica in a restart loop
        raise model.ClassifierMissing(f"intent classifier not found at {path} (AIOS_CACHE_DIR): the inference "
                                      "image bakes it in; elsewhere run `make model` first")
    return build_app(path, torch_threads=args.torch_threads, cost_per_1k_texts=args.cost_per_1k_texts,
                     tiers=args.tier_specs(), embedding_cache_size=args.embedding_cache_size)
