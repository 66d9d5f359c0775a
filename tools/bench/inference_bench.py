"""Inference benchmark against a running service, side by side with the same model in this process:
``python -m tools.bench.inference_bench --url http://127.0.0.1:18000``.

The reference is the model without serving: ``TierModel`` (the class each tier
runs) loaded here with the tier's own settings (torch threads, CPU priority,
forward-pass size, read from ``/v1/models``), on the same cores, while the
service is idle. Every load loop is bounded in count and time.

- low-latency tier: p50/p95 of one short text, sequential calls, alone and
  while a second process keeps the high-throughput tier busy (16 callers of
  64-text bulk requests); against the in-process single-call p95 (the lower of
  the tier's torch threads and one thread per core). With the tier's direct
  door (``door_url``, what the mesh's interactive calls use), calls alternate
  between the door and the router, so both paths meet the same load; the
  headline is the door's, the router's is kept as ``via_router``.
- high-throughput tier: texts/s with 16 concurrent callers sending 64-text
  requests (what the planner sends; the tier packs the requests waiting for the
  model into one model call), against the in-process batched ceiling (every
  text in one model call, best forward-pass size).
- for reference: 32 concurrent single-text requests, sequential single-text
  bulk requests, and the in-process rate one text per call.

On a shared machine the load drifts, so each comparison is made of rounds that
alternate the two sides: throughput keeps the best round of each side, latency
pools every round's calls. The client shares the cores with the service, so
service figures include HTTP and client overhead; the in-process figures
include neither. Importable: ``run_inference_bench(url) -> dict``."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
import os
import statistics
import time
from functools import lru_cache
from typing import Any

import httpx

from tools.bench import cpu as proc_cpu

SHORT_TEXT = "I think my card was stolen"
FALLBACK_TEXTS = [
    "I lost my card", "How do I top up with Apple Pay?", "Why was I charged a fee for a transfer?",
    "My card payment was declined", "Can I change my PIN at an ATM?", "Where is my refund?",
    "What exchange rate do you use?", "My transfer has not arrived yet",
]
PLANNER_BATCH = 64  # texts per bulk request: the planner's consumer batch (AIOS_PLANNER_BATCH_SIZE)
# Concurrent bulk callers (planner replicas, memory's bulk writes): enough texts in flight that the
# tier always has a full model call waiting (2 x its max_batch_size of 512 texts).
BULK_CALLERS = 16


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
def in_process_model(threads: int, nice: int, encode_batch_size: int, sched_idle: bool = False) -> Any:
    """The tiers' own model class with one tier's settings (cached: loading costs seconds)."""
    from services.inference import model
    from services.inference.encoder import TierModel

    return TierModel(model.classifier_path(), threads=threads, device="cpu", encode_batch_size=encode_batch_size,
                     nice=nice, sched_idle=sched_idle, name=f"bench-{threads}t-nice{nice}-idle{int(sched_idle)}")


def tier_model_for(spec: dict[str, Any], threads: int | None = None) -> Any:
    """The in-process model with a tier's settings (as ``/v1/models`` reports them)."""
    return in_process_model(threads or spec["torch_threads"], spec["nice"], spec["encode_batch_size"],
                            bool(spec.get("sched_idle")))


def priority_label(spec: dict[str, Any]) -> str:
    """How a tier's model thread yields the CPU, for method strings."""
    return "SCHED_IDLE" if spec.get("sched_idle") else f"nice {spec['nice']}"


def _run(tier_model: Any, texts: list[str], encode_batch_size: int | None = None) -> list[dict[str, Any]]:
    """One model call, on the model's own thread (where its priority and torch threads live)."""
    return list(tier_model.run_blocking([texts], encode_batch_size))


def in_process_single(spec: dict[str, Any], calls: int, time_limit_s: float = 60.0) -> dict[int, list[float]]:
    """Latencies (ms) of one text per model call, sequentially, with the low-latency tier's torch
    threads and with one thread per core (the caller keeps the faster as the reference)."""
    found = {}
    for threads in sorted({int(spec["torch_threads"]), len(os.sched_getaffinity(0))}):
        tier_model = tier_model_for(spec, threads)
        pool = _texts(calls + 5)
        for text in pool[:5]:
            _run(tier_model, [text])
        latencies: list[float] = []
        deadline = time.monotonic() + time_limit_s
        for text in pool[5:]:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            _run(tier_model, [text])
            latencies.append((time.perf_counter() - t0) * 1000)
        found[threads] = latencies
    return found


def in_process_ceiling(spec: dict[str, Any], texts: int = 512) -> dict[str, Any]:
    """Every text in one model call, at the best of a few forward-pass sizes, with the bulk tier's settings."""
    tier_model = tier_model_for(spec)
    pool = _texts(texts)
    _run(tier_model, pool[:64])
    best, best_size, best_cpu = 0.0, 0, 0.0
    for size in sorted({spec["encode_batch_size"], 16, 32, 64}):
        started, cpu = time.perf_counter(), proc_cpu.tree_cpu_seconds([os.getpid()])
        _run(tier_model, pool, size)
        rate = texts / (time.perf_counter() - started)
        if rate > best:
            best, best_size, best_cpu = rate, size, proc_cpu.tree_cpu_seconds([os.getpid()]) - cpu
    return {"texts": texts, "texts_per_s": round(best, 1), "encode_batch_size": best_size,
            "cpu_ms_per_text": round(best_cpu * 1000 / texts, 2)}


# -- the service --------------------------------------------------------------------------------------
def bench_low_latency(urls: list[str], calls: int = 200, warmup: int = 20,
                      time_limit_s: float = 60.0) -> list[dict[str, Any]]:
    """One figure per URL (the tier's door, the router), their calls alternating."""
    return [{"tier": "low_latency", "calls": len(latencies), **_percentiles(latencies)}
            for latencies in _low_latency_samples(urls, calls, warmup, time_limit_s)]


def _low_latency_samples(urls: list[str], calls: int, warmup: int, time_limit_s: float) -> list[list[float]]:
    """Latencies (ms) of sequential one-text interactive classify calls, per URL, taking turns."""
    body = {"texts": [SHORT_TEXT], "latency_class": "interactive"}
    latencies: list[list[float]] = [[] for _ in urls]
    clients = [httpx.Client(base_url=url, timeout=30) for url in urls]
    try:
        for http in clients:
            for _ in range(warmup):
                http.post("/v1/classify", json=body).raise_for_status()
        deadline = time.monotonic() + time_limit_s
        while len(latencies[-1]) < calls and time.monotonic() < deadline:
            for http, samples in zip(clients, latencies, strict=True):
                start = time.perf_counter()
                http.post("/v1/classify", json=body).raise_for_status()
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        for http in clients:
            http.close()
    return latencies


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


def bench_batched_bulk(url: str, concurrency: int = BULK_CALLERS, texts: int = 1024, time_limit_s: float = 60.0,
                       service_pid: int | None = None) -> dict[str, Any]:
    """The planner's pattern: ``concurrency`` callers, each sending 64-text bulk requests back to back.
    With ``service_pid``, also the CPU the service's processes and this client spent per text."""
    roots = [os.getpid()] + ([service_pid] if service_pid else [])
    cpu = proc_cpu.tree_cpu_seconds(roots)
    done, seconds, latencies = asyncio.run(_concurrent(url, _bulk_bodies(texts), concurrency, time_limit_s))
    result = {"concurrency": concurrency, "texts_per_request": PLANNER_BATCH, "texts": done,
              "seconds": round(seconds, 2), "texts_per_s": round(done / seconds, 1), **_percentiles(latencies)}
    if service_pid:
        result["cpu_ms_per_text"] = round((proc_cpu.tree_cpu_seconds(roots) - cpu) * 1000 / done, 2)
    return result


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


def low_latency_under_load(url: str, calls: int, load_concurrency: int = BULK_CALLERS,
                           time_limit_s: float = 90.0, *,
                           urls: list[str] | None = None) -> tuple[list[list[float]], dict[str, float]]:
    """Latencies (ms) of sequential interactive calls to each of ``urls`` (default: ``url``), taking
    turns, while another process keeps the bulk tier of ``url`` busy, and what that process got
    through (texts, seconds)."""
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    load = ctx.Process(target=_bulk_load, args=(url, load_concurrency, 200_000, time_limit_s + 30, stop, out),
                       daemon=True)
    load.start()
    try:
        time.sleep(3.0)  # the child imports, connects and fills the bulk tier's queue
        latencies = _low_latency_samples(urls or [url], calls, warmup=5, time_limit_s=time_limit_s)
    finally:
        stop.set()
        load.join(timeout=90)
        if load.is_alive():  # our own child, by its handle
            load.terminate()
            load.join(timeout=10)
    bulk = out.get(timeout=5) if not out.empty() else {"texts": 0, "seconds": 0.0}
    return latencies, bulk


def tier_specs(url: str) -> dict[str, dict[str, Any]]:
    """The tiers' settings as the service reports them (``/v1/models``)."""
    return dict(httpx.get(url + "/v1/models", timeout=30).raise_for_status().json()["tiers"])


def run_inference_bench(url: str, *, calls: int = 200, rounds: int = 3, texts: int = 3072,
                        baseline: bool = True, service_pid: int | None = None, door_url: str = "") -> dict[str, Any]:
    """Every figure above as one dict (also what ``tools/bench/run.py`` records). With the PID of
    the inference process (``service_pid``), also CPU per text: the tier (every process of the
    service, and this client) against the model alone, a figure other load on the box barely moves."""
    load_before = os.getloadavg()[0]
    url = url.rstrip("/")
    httpx.get(url + "/healthz", timeout=10).raise_for_status()
    specs = tier_specs(url)
    ll_spec, ht_spec = specs["low_latency"], specs["high_throughput"]
    door_note = ""
    if door_url:
        try:
            httpx.get(door_url.rstrip("/") + "/healthz", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:  # e.g. its port was taken: the mesh's calls go through the router
            door_note, door_url = f"the low-latency tier's door at {door_url} did not answer ({exc})", ""
            print(f"note: {door_note}; measuring the router only", flush=True)
    urls = [door_url.rstrip("/"), url] if door_url else [url]  # the mesh's interactive path first
    low_by_url = bench_low_latency(urls, calls)
    bench_batched_bulk(url, texts=256)  # warm the bulk tier and connections
    per_round = max(20, calls // rounds)
    ceilings, tier_runs, bulk_during = [], [], []
    loaded: list[list[float]] = [[] for _ in urls]
    alone: dict[int, list[float]] = {}
    for _ in range(rounds):
        if baseline:
            ceilings.append(in_process_ceiling(ht_spec))
        tier_runs.append(bench_batched_bulk(url, texts=texts, service_pid=service_pid))
        if baseline:
            for threads, samples in in_process_single(ll_spec, per_round).items():
                alone.setdefault(threads, []).extend(samples)
        samples, bulk = low_latency_under_load(url, per_round, urls=urls)
        for pooled, more in zip(loaded, samples, strict=True):
            pooled += more
        bulk_during.append(bulk)
    high = dict(max(tier_runs, key=lambda r: r["texts_per_s"]))
    high.update({"tier": "high_throughput", "method": f"{high['concurrency']} concurrent callers, "
                 f"{PLANNER_BATCH}-text bulk requests over HTTP, best of {len(tier_runs)} rounds",
                 "rounds_texts_per_s": [r["texts_per_s"] for r in tier_runs],
                 "single_text_requests": bench_single_text_bulk(url)})
    fanout = bench_batched_bulk(url, concurrency=4, texts=512)  # the figure earlier runs recorded
    high["fanout_64_text_requests"] = {k: fanout[k] for k in ("concurrency", "texts", "texts_per_s")}
    bulk_texts, bulk_s = sum(b["texts"] for b in bulk_during), sum(b["seconds"] for b in bulk_during)
    bulk_load = {"concurrency": BULK_CALLERS, "texts_per_request": PLANNER_BATCH, "texts": bulk_texts,
                 "texts_per_s": round(bulk_texts / bulk_s, 1) if bulk_s else 0.0}
    paths = ["the tier's direct door (AIOS_INFERENCE_INTERACTIVE_URL)", "Serve's proxy and router"] \
        if door_url else ["Serve's proxy and router"]
    for figure, samples, path in zip(low_by_url, loaded, paths, strict=True):
        figure["path"] = path
        figure["under_bulk_load"] = {
            "calls": len(samples), **_percentiles(samples),
            "method": f"sequential one-text interactive calls through {path} in {rounds} rounds alternating with "
                      "the in-process single call" + (", taking turns with the other path" if door_url else "")
                      + f", while another process sends {PLANNER_BATCH}-text bulk requests ({BULK_CALLERS} callers)",
            "bulk_load": bulk_load}
    low = low_by_url[0]
    if door_url:
        low["via_router"] = low_by_url[1]
    elif door_note:
        low["door_missing"] = door_note
    result: dict[str, Any] = {"url": url, "tiers": specs, "low_latency": low, "high_throughput": high,
                              "tier_rounds": tier_runs,
                              "load_average_1m": {"before": round(load_before, 2),
                                                  "after": round(os.getloadavg()[0], 2)}}
    if baseline:
        _compare(result, ceilings, alone, ht_spec, ll_spec)
        result["baseline"]["service_sequential"] = bench_sequential_bulk(url)
    result["stats"] = httpx.get(url + "/v1/stats", timeout=30).json()
    return result


def _compare(result: dict[str, Any], ceilings: list[dict[str, Any]], alone: dict[int, list[float]],
             ht_spec: dict[str, Any], ll_spec: dict[str, Any]) -> None:
    """The in-process references, and each tier's figure against them."""
    low, high = result["low_latency"], result["high_throughput"]
    ceiling = max(ceilings, key=lambda c: c["texts_per_s"])
    by_threads = {threads: _percentiles(samples) for threads, samples in alone.items()}
    threads = min(by_threads, key=lambda t: by_threads[t]["p95_ms"])  # the faster: the stricter reference
    single = by_threads[threads]
    rate = round(1000 / single["mean_ms"], 1)
    result["baseline"] = {
        "unbatched": {"method": f"in-process classify, one text per call, torch threads {threads}",
                      "texts": len(alone[threads]), "texts_per_s": rate},
        "batched_ceiling": {"method": f"in-process classify, all {ceiling['texts']} texts in one model call "
                                      f"(forward passes of {ceiling['encode_batch_size']}), torch threads "
                                      f"{ht_spec['torch_threads']}, {priority_label(ht_spec)} (the bulk tier's), "
                                      f"service idle, best of {len(ceilings)} rounds alternating with the tier",
                            "texts": ceiling["texts"], "texts_per_s": ceiling["texts_per_s"],
                            "rounds_texts_per_s": [c["texts_per_s"] for c in ceilings]},
        "single_call": {"method": f"in-process classify (encode + classifier), one text per call, sequential, "
                                  f"{priority_label(ll_spec)}, service idle, in rounds alternating with the tier "
                                  f"under load; torch threads {threads} (the lower p95 of {sorted(by_threads)})",
                        "torch_threads": threads, "calls": len(alone[threads]), **single,
                        "by_torch_threads": by_threads},
    }
    high["speedup_vs_unbatched"] = round(high["texts_per_s"] / rate, 2)
    high["vs_in_process_ceiling"] = round(high["texts_per_s"] / ceiling["texts_per_s"], 3)
    if "cpu_ms_per_text" in high:
        # CPU per text, each side's median round: the model alone over the whole serving path.
        model_cpu = statistics.median(c["cpu_ms_per_text"] for c in ceilings)
        served_cpu = statistics.median(r["cpu_ms_per_text"] for r in result["tier_rounds"])
        high["cpu_efficiency_vs_in_process"] = round(model_cpu / served_cpu, 3)
    for figure in (low, low.get("via_router")):
        if figure:
            figure["in_process_p95_ms"] = single["p95_ms"]
            figure["p95_minus_in_process_ms"] = round(figure["under_bulk_load"]["p95_ms"] - single["p95_ms"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:18000", help="inference service base URL")
    parser.add_argument("--calls", type=int, default=200, help="sequential low-latency calls")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the service and the model")
    parser.add_argument("--texts", type=int, default=3072, help="texts sent to the high-throughput tier per round")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process model")
    parser.add_argument("--service-pid", type=int, default=None, help="PID of the inference process (CPU per text)")
    parser.add_argument("--door-url", default="", help="the low-latency tier's direct door, measured beside the router")
    args = parser.parse_args()
    result = run_inference_bench(args.url, calls=args.calls, rounds=args.rounds, texts=args.texts,
                                 baseline=not args.no_baseline, service_pid=args.service_pid,
                                 door_url=args.door_url)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
