"""Inference benchmark against a running service, side by side with the same model in this process:
``python -m tools.bench.inference_bench --url http://127.0.0.1:18000``.

The reference is the model without serving: ``TierModel`` (the class each tier
runs) loaded here with the tier's own settings (torch threads, CPU priority,
forward-pass size, read from ``/v1/models``), on the same cores, while the
service is idle. Every load loop is bounded in count and time.

- low-latency tier: p50/p95 of one short text, sequential calls, alone and
  while a second process keeps the high-throughput tier busy (the planner's
  pattern: 64-text bulk requests); against the in-process single-call p95.
- high-throughput tier: texts/s with a few concurrent callers sending 64-text
  requests (what the planner sends; the tier's batcher packs concurrent ones
  into one model call), against the in-process batched ceiling (every text in
  one model call, best forward-pass size); rounds alternate the two so drift
  on a shared machine hits both; best of the rounds on each side.
- for reference: 32 concurrent single-text requests, sequential single-text
  bulk requests, and the in-process rate one text per call.

The client shares the cores with the service, so service figures include HTTP
and client overhead; the in-process figures include neither. Importable:
``run_inference_bench(url) -> dict``."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
import statistics
import time
from functools import lru_cache
from typing import Any

import httpx

SHORT_TEXT = "I think my card was stolen"
FALLBACK_TEXTS = [
    "I lost my card", "How do I top up with Apple Pay?", "Why was I charged a fee for a transfer?",
    "My card payment was declined", "Can I change my PIN at an ATM?", "Where is my refund?",
    "What exchange rate do you use?", "My transfer has not arrived yet",
]
PLANNER_BATCH = 64  # texts per bulk request: the planner's consumer batch (AIOS_PLANNER_BATCH_SIZE)


def _texts(n: int) -> list[str]:
    """Realistic messages: the held-out BANKING77 rows when present."""
    from services.inference.model import holdout_path

    path = holdout_path()
    pool = FALLBACK_TEXTS
    if path.exists():
        with path.open(newline="", encoding="utf-8") as fh:
            pool = [r["text"] for r in csv.DictReader(fh)] or FALLBACK_TEXTS
    return [pool[(i * 7919) % len(pool)] for i in range(n)]  # spread over intents (the file is grouped)


def _percentiles(ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50_ms": round(cuts[49], 2), "p95_ms": round(cuts[94], 2), "p99_ms": round(cuts[98], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


# -- the model in this process ----------------------------------------------------------------------
@lru_cache(maxsize=4)
def in_process_model(threads: int, nice: int, encode_batch_size: int) -> Any:
    """The tiers' own model class with one tier's settings (cached: loading costs seconds)."""
    from services.inference import model
    from services.inference.encoder import TierModel

    return TierModel(model.classifier_path(), threads=threads, device="cpu", encode_batch_size=encode_batch_size,
                     nice=nice, name=f"bench-nice{nice}")


def _run(tier_model: Any, texts: list[str], encode_batch_size: int | None = None) -> list[dict[str, Any]]:
    """One model call, on the model's own thread (where its priority and torch threads live)."""
    return list(tier_model.run_blocking([texts], encode_batch_size))


def in_process_single(spec: dict[str, Any], calls: int = 200, time_limit_s: float = 60.0) -> dict[str, Any]:
    """One text per model call, sequentially, with the low-latency tier's settings: latency and rate."""
    tier_model = in_process_model(spec["torch_threads"], spec["nice"], spec["encode_batch_size"])
    pool = _texts(calls)
    for text in pool[:10]:
        _run(tier_model, [text])
    latencies: list[float] = []
    deadline = time.monotonic() + time_limit_s
    started = time.perf_counter()
    for text in pool:
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        _run(tier_model, [text])
        latencies.append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    return {"method": f"in-process classify (encode + classifier), one text per call, sequential, torch threads "
                      f"{spec['torch_threads']}, nice {spec['nice']}, service idle",
            "calls": len(latencies), "texts_per_s": round(len(latencies) / seconds, 1), **_percentiles(latencies)}


def in_process_ceiling(spec: dict[str, Any], texts: int = 512) -> dict[str, Any]:
    """Every text in one model call, at the better of two forward-pass sizes, with the bulk tier's settings."""
    tier_model = in_process_model(spec["torch_threads"], spec["nice"], spec["encode_batch_size"])
    pool = _texts(texts)
    _run(tier_model, pool[:64])
    best, best_size = 0.0, 0
    for size in sorted({spec["encode_batch_size"], 32, 64}):
        started = time.perf_counter()
        _run(tier_model, pool, size)
        rate = texts / (time.perf_counter() - started)
        if rate > best:
            best, best_size = rate, size
    return {"texts": texts, "texts_per_s": round(best, 1), "encode_batch_size": best_size}


# -- the service --------------------------------------------------------------------------------------
def bench_low_latency(url: str, calls: int = 200, warmup: int = 20, time_limit_s: float = 60.0) -> dict[str, Any]:
    body = {"texts": [SHORT_TEXT], "latency_class": "interactive"}
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(warmup):
            http.post("/v1/classify", json=body).raise_for_status()
        deadline = time.monotonic() + time_limit_s
        while len(latencies) < calls and time.monotonic() < deadline:
            start = time.perf_counter()
            http.post("/v1/classify", json=body).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return {"tier": "low_latency", "calls": len(latencies), **_percentiles(latencies)}


async def _concurrent(url: str, bodies: list[dict[str, Any]], concurrency: int,
                      time_limit_s: float) -> tuple[int, float, list[float]]:
    """Send bodies with at most ``concurrency`` in flight; (texts done, seconds, latencies ms)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done, latencies = 0, []
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        deadline = time.monotonic() + time_limit_s

        async def worker() -> None:
            nonlocal done
            while queue and time.monotonic() < deadline:
                body = queue.pop()
                start = time.perf_counter()
                (await http.post("/v1/classify", json=body)).raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)
                done += len(body["texts"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - started, latencies


def _bulk_bodies(texts: int, per_request: int = PLANNER_BATCH) -> list[dict[str, Any]]:
    pool = _texts(texts)
    return [{"texts": pool[i:i + per_request], "latency_class": "bulk"} for i in range(0, texts, per_request)]


def bench_batched_bulk(url: str, concurrency: int = 4, texts: int = 1024, time_limit_s: float = 60.0) -> dict[str, Any]:
    """The planner's pattern: ``concurrency`` callers, each sending 64-text bulk requests back to back."""
    done, seconds, latencies = asyncio.run(_concurrent(url, _bulk_bodies(texts), concurrency, time_limit_s))
    return {"concurrency": concurrency, "texts_per_request": PLANNER_BATCH, "texts": done,
            "seconds": round(seconds, 2), "texts_per_s": round(done / seconds, 1), **_percentiles(latencies)}


def bench_single_text_bulk(url: str, concurrency: int = 32, texts: int = 1024,
                           time_limit_s: float = 60.0) -> dict[str, Any]:
    """Many callers sending one text each: the batcher alone packs them; HTTP costs more per text."""
    pool = _texts(texts)
    asyncio.run(_concurrent(url, [{"texts": [t], "latency_class": "bulk"} for t in pool[:64]], concurrency, 30))
    singles = [{"texts": [t], "latency_class": "bulk"} for t in pool]
    done, seconds, latencies = asyncio.run(_concurrent(url, singles, concurrency, time_limit_s))
    return {"concurrency": concurrency, "texts": done, "seconds": round(seconds, 2),
            "texts_per_s": round(done / seconds, 1), **_percentiles(latencies)}


def bench_sequential_bulk(url: str, calls: int = 100, time_limit_s: float = 30.0) -> dict[str, Any]:
    """Unbatched through the service: one single-text bulk request at a time."""
    pool = _texts(calls)
    with httpx.Client(base_url=url, timeout=30) as http:
        http.post("/v1/classify", json={"texts": pool[:1], "latency_class": "bulk"}).raise_for_status()
        deadline, done, start = time.monotonic() + time_limit_s, 0, time.perf_counter()
        for text in pool:
            if time.monotonic() > deadline:
                break
            http.post("/v1/classify", json={"texts": [text], "latency_class": "bulk"}).raise_for_status()
            done += 1
        seconds = time.perf_counter() - start
    return {"method": "sequential single-text requests to the high-throughput tier over HTTP",
            "texts": done, "texts_per_s": round(done / seconds, 1)}


def _bulk_load(url: str, concurrency: int, max_texts: int, time_limit_s: float, stop: Any, out: Any) -> None:
    """Runs in a child process: 64-text bulk requests until ``stop``, ``max_texts`` or the time limit."""
    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        bodies = _bulk_bodies(PLANNER_BATCH * 16)
        deadline = time.monotonic() + time_limit_s
        done = 0
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            async def worker(k: int) -> None:
                nonlocal done
                i = k
                while not stop.is_set() and done < max_texts and time.monotonic() < deadline:
                    body = bodies[i % len(bodies)]
                    (await http.post("/v1/classify", json=body)).raise_for_status()
                    done += len(body["texts"])
                    i += concurrency

            started = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            out.put({"texts": done, "seconds": time.perf_counter() - started})

    asyncio.run(main())


def bench_low_latency_under_load(url: str, calls: int = 200, load_concurrency: int = 4,
                                 time_limit_s: float = 90.0) -> dict[str, Any]:
    """Sequential interactive calls while another process keeps the bulk tier busy."""
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    load = ctx.Process(target=_bulk_load, args=(url, load_concurrency, 200_000, time_limit_s + 30, stop, out),
                       daemon=True)
    load.start()
    try:
        time.sleep(3.0)  # the child imports, connects and fills the bulk tier's queue
        result = bench_low_latency(url, calls=calls, warmup=5, time_limit_s=time_limit_s)
    finally:
        stop.set()
        load.join(timeout=90)
        if load.is_alive():  # our own child, by its handle
            load.terminate()
            load.join(timeout=10)
    bulk = out.get(timeout=5) if not out.empty() else {"texts": 0, "seconds": 0.0}
    result["bulk_load"] = {"concurrency": load_concurrency, "texts_per_request": PLANNER_BATCH,
                           "texts": bulk["texts"],
                           "texts_per_s": round(bulk["texts"] / bulk["seconds"], 1) if bulk["seconds"] else 0.0}
    return result


def tier_specs(url: str) -> dict[str, dict[str, Any]]:
    """The tiers' settings as the service reports them (``/v1/models``)."""
    return dict(httpx.get(url + "/v1/models", timeout=30).raise_for_status().json()["tiers"])


def run_inference_bench(url: str, *, calls: int = 200, rounds: int = 3, texts: int = 1024,
                        baseline: bool = True) -> dict[str, Any]:
    """Every figure above as one dict (also what ``tools/bench/run.py`` records)."""
    url = url.rstrip("/")
    httpx.get(url + "/healthz", timeout=10).raise_for_status()
    specs = tier_specs(url)
    ll_spec, ht_spec = specs["low_latency"], specs["high_throughput"]
    low = bench_low_latency(url, calls)
    bench_batched_bulk(url, texts=256)  # warm the bulk tier and connections
    ceilings, tier_runs = [], []
    for _ in range(rounds if baseline else 1):
        if baseline:
            ceilings.append(in_process_ceiling(ht_spec))
        tier_runs.append(bench_batched_bulk(url, texts=texts))
    high = max(tier_runs, key=lambda r: r["texts_per_s"])
    high.update({"tier": "high_throughput", "method": f"{high['concurrency']} concurrent callers, "
                 f"{PLANNER_BATCH}-text bulk requests over HTTP, best of {len(tier_runs)} rounds",
                 "rounds_texts_per_s": [r["texts_per_s"] for r in tier_runs],
                 "single_text_requests": bench_single_text_bulk(url)})
    low["under_bulk_load"] = bench_low_latency_under_load(url, calls)
    result: dict[str, Any] = {"url": url, "tiers": specs, "low_latency": low, "high_throughput": high}
    if baseline:
        ceiling = max(ceilings, key=lambda c: c["texts_per_s"])
        single = in_process_single(ll_spec, calls)
        result["baseline"] = {
            "unbatched": {"method": single["method"], "texts": single["calls"], "texts_per_s": single["texts_per_s"]},
            "batched_ceiling": {"method": f"in-process classify, all {ceiling['texts']} texts in one model call "
                                          f"(forward passes of {ceiling['encode_batch_size']}), torch threads "
                                          f"{ht_spec['torch_threads']}, nice {ht_spec['nice']} (the bulk tier's), "
                                          f"service idle, best of {len(ceilings)} rounds alternating with the tier",
                                "texts": ceiling["texts"], "texts_per_s": ceiling["texts_per_s"],
                                "rounds_texts_per_s": [c["texts_per_s"] for c in ceilings]},
            "single_call": single,
            "service_sequential": bench_sequential_bulk(url),
        }
        high["speedup_vs_unbatched"] = round(high["texts_per_s"] / single["texts_per_s"], 2)
        high["vs_in_process_ceiling"] = round(high["texts_per_s"] / ceiling["texts_per_s"], 3)
        low["in_process_p95_ms"] = single["p95_ms"]
        low["p95_minus_in_process_ms"] = round(low["under_bulk_load"]["p95_ms"] - single["p95_ms"], 2)
    result["stats"] = httpx.get(url + "/v1/stats", timeout=30).json()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:18000", help="inference service base URL")
    parser.add_argument("--calls", type=int, default=200, help="sequential low-latency calls")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ceiling / tier rounds")
    parser.add_argument("--texts", type=int, default=1024, help="texts sent to the high-throughput tier per round")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process model")
    args = parser.parse_args()
    result = run_inference_bench(args.url, calls=args.calls, rounds=args.rounds, texts=args.texts,
                                 baseline=not args.no_baseline)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
