"""Inference benchmark against a running service:
``python -m tools.bench.inference_bench --url http://127.0.0.1:18000``.

Measures, bounded in count and time:
- low-latency tier: p50/p95 of one short text, 200 sequential calls after a warm-up;
- high-throughput tier: texts/s with 32 concurrent single-text requests (the
  tier's dynamic batcher packs them), and with a few 64-text requests fanned out;
- unbatched baseline: the same model in this process, encoding one text at a
  time with the same torch thread count, on the same cores (the service is
  idle meanwhile); for reference also the in-process batched ceiling and
  sequential single-text calls to the high-throughput tier over HTTP.

The client shares the 2 cores with the service, so the service figures include
HTTP and client overhead; the baseline includes neither. Importable:
``run_inference_bench(url) -> dict``."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import time
from typing import Any

import httpx

SHORT_TEXT = "I think my card was stolen"
FALLBACK_TEXTS = [
    "I lost my card", "How do I top up with Apple Pay?", "Why was I charged a fee for a transfer?",
    "My card payment was declined", "Can I change my PIN at an ATM?", "Where is my refund?",
    "What exchange rate do you use?", "My transfer has not arrived yet",
]


def _texts(n: int) -> list[str]:
    """Realistic messages: the held-out BANKING77 rows when present."""
    from services.inference.model import holdout_path

    path = holdout_path()
    pool = FALLBACK_TEXTS
    if path.exists():
        with path.open(newline="", encoding="utf-8") as fh:
            pool = [r["text"] for r in csv.DictReader(fh)] or FALLBACK_TEXTS
    return [pool[i % len(pool)] for i in range(n)]


def _percentiles(ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50_ms": round(cuts[49], 2), "p95_ms": round(cuts[94], 2), "p99_ms": round(cuts[98], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


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


def bench_high_throughput(url: str, concurrency: int = 32, texts: int = 1024,
                          time_limit_s: float = 60.0) -> dict[str, Any]:
    pool = _texts(texts)
    # Warm the batcher and connections so the clock measures steady state.
    asyncio.run(_concurrent(url, [{"texts": [t], "latency_class": "bulk"} for t in pool[:64]], concurrency, 30))
    singles = [{"texts": [t], "latency_class": "bulk"} for t in pool]
    done, seconds, latencies = asyncio.run(_concurrent(url, singles, concurrency, time_limit_s))
    result = {"tier": "high_throughput", "concurrency": concurrency, "texts": done, "seconds": round(seconds, 2),
              "texts_per_s": round(done / seconds, 1), **_percentiles(latencies)}
    chunks = [{"texts": pool[i:i + 64], "latency_class": "bulk"} for i in range(0, min(len(pool), 512), 64)]
    done, seconds, _ = asyncio.run(_concurrent(url, chunks, 4, time_limit_s))
    result["fanout_64_text_requests"] = {"concurrency": 4, "texts": done, "texts_per_s": round(done / seconds, 1)}
    return result


def bench_sequential_bulk(url: str, calls: int = 100, time_limit_s: float = 30.0) -> dict[str, Any]:
    """Unbatched through the service: one single-text bulk request at a time
    (each waits out the tier's 20 ms batch window, so this is a floor)."""
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


def bench_in_process(texts: int = 200, batched_texts: int = 512, threads: int = 2,
                     rounds: int = 3) -> dict[str, Any]:
    """The unbatched baseline: the same model, one text per forward pass.
    Best of ``rounds``: on a shared 2-core box, contention from other
    processes only ever slows a round down (conservative for the speedup)."""
    from services.inference import model

    encoder = model.load_encoder(threads)
    pool = _texts(max(texts, batched_texts))
    for text in pool[:10]:
        model.encode(encoder, [text])
    per_round = max(1, texts // rounds)
    unbatched = []
    for r in range(rounds):
        start = time.perf_counter()
        for text in pool[r * per_round:(r + 1) * per_round]:
            model.encode(encoder, [text], batch_size=1)
        unbatched.append(per_round / (time.perf_counter() - start))
    batched = []
    for _ in range(2):
        start = time.perf_counter()
        model.encode(encoder, pool[:batched_texts], batch_size=64)
        batched.append(batched_texts / (time.perf_counter() - start))
    return {
        "unbatched": {"method": f"in-process encode, one text per call, torch threads={threads}, same cores, "
                                f"best of {rounds} rounds", "texts": per_round * rounds,
                      "texts_per_s": round(max(unbatched), 1)},
        "batched_ceiling": {"method": "in-process encode, batches of 64, no HTTP, best of 2",
                            "texts": batched_texts, "texts_per_s": round(max(batched), 1)},
    }


def run_inference_bench(url: str, *, calls: int = 200, concurrency: int = 32, texts: int = 1024,
                        baseline: bool = True) -> dict[str, Any]:
    """Every figure above as one dict (also what ``tools/bench/run.py`` records)."""
    url = url.rstrip("/")
    httpx.get(url + "/healthz", timeout=10).raise_for_status()
    result: dict[str, Any] = {"url": url, "low_latency": bench_low_latency(url, calls),
                              "high_throughput": bench_high_throughput(url, concurrency, texts)}
    if baseline:
        result["baseline"] = bench_in_process()
        result["baseline"]["service_sequential"] = bench_sequential_bulk(url)
        unbatched = result["baseline"]["unbatched"]["texts_per_s"]
        result["high_throughput"]["speedup_vs_unbatched"] = round(
            result["high_throughput"]["texts_per_s"] / unbatched, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:18000", help="inference service base URL")
    parser.add_argument("--calls", type=int, default=200, help="sequential low-latency calls")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent high-throughput requests")
    parser.add_argument("--texts", type=int, default=1024, help="texts sent to the high-throughput tier")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process baseline")
    args = parser.parse_args()
    result = run_inference_bench(args.url, calls=args.calls, concurrency=args.concurrency, texts=args.texts,
                                 baseline=not args.no_baseline)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
