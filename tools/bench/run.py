"""`make bench`: every figure the README quotes, measured in one run on this
machine, printed and written to bench/results.json and docs/benchmarks.md
(the README's benchmark section is regenerated from the same numbers)."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from typing import Any

from infra.stack import Ports, Stack
from services.common.catalog import REPO_ROOT
from tools.bench import mesh_bench

RESULTS = REPO_ROOT / "bench" / "results.json"
REPORT = REPO_ROOT / "docs" / "benchmarks.md"


def orchestration(results: dict[str, Any], quick: bool) -> None:
    stack = Stack(Ports.fresh(), run_dir=REPO_ROOT / ".run" / "bench", topic_prefix=f"bench{int(time.time())}.",
                  tenant="bench")
    try:
        stack.up(inference=False)
        env = stack.env()
        fetch_wait = int(env.get("AIOS_FETCH_WAIT_MS", "10"))
        print("raw Kafka request/reply round trip ...", flush=True)
        results["kafka_round_trip"] = mesh_bench.raw_round_trip(env["AIOS_KAFKA_BOOTSTRAP"], fetch_wait,
                                                               n=100 if quick else 300)
        print("orchestration overhead per step (10-step no-op chain, one run at a time) ...", flush=True)
        results["step_overhead"] = mesh_bench.step_overhead(stack, runs=10 if quick else 30)
        rt, so = results["kafka_round_trip"], results["step_overhead"]
        so["p50_vs_round_trip"] = so["p50_ms"] / rt["p50_ms"]
        so["p99_vs_round_trip"] = so["p99_ms"] / rt["p99_ms"]
        print("throughput of a 3-step workflow ...", flush=True)
        results["throughput"] = mesh_bench.throughput(stack, n_runs=200 if quick else 600)
        print("recovery after kill -9 of the planner under load ...", flush=True)
        results["recovery"] = mesh_bench.recovery(stack, n_orders=100 if quick else 200)
    finally:
        stack.down()


def inference(results: dict[str, Any], quick: bool, tiers: bool = True) -> None:
    """The inference tiers, then triage through the whole mesh (``tiers=False``: triage only)."""
    from tools.bench import inference_bench, triage_bench

    stack = Stack(Ports.fresh(), run_dir=REPO_ROOT / ".run" / "bench-inf", topic_prefix=f"binf{int(time.time())}.",
                  tenant="demo")
    try:
        stack.up()
        url = stack.env()["AIOS_INFERENCE_URL"]
        if tiers:
            print("inference tiers: each against the same model in this process, side by side ...", flush=True)
            results["inference"] = inference_bench.run_inference_bench(url, calls=100 if quick else 200,
                                                                       rounds=2 if quick else 3,
                                                                       service_pid=stack.procs["inference"].pid,
                                                                       door_url=stack.env()["AIOS_INFERENCE_INTERACTIVE_URL"])
        print("support triage through the whole mesh vs the model's own batched rate ...", flush=True)
        results["triage"] = triage_bench.run(stack, n=100 if quick else 300)
        for part in ("inference", "triage") if tiers else ("triage",):
            results[part]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    finally:
        stack.down()


def burst(results: dict[str, Any], quick: bool) -> None:
    """Issue 7's burst figure (tools/bench/burst_bench.py), on a stack of its own."""
    from tools.bench import burst_bench

    stack = Stack(Ports.fresh(), run_dir=REPO_ROOT / ".run" / "bench-burst", topic_prefix=f"bburst{int(time.time())}.",
                  tenant="demo")
    try:
        stack.up()
        print("a burst of support messages at once vs one unloaded run ...", flush=True)
        results["burst"] = burst_bench.run(stack, n=500 if quick else 2000)
        results["burst"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    finally:
        stack.down()


def render(results: dict[str, Any]) -> str:
    rt, so, tp, rc = (results.get(k, {}) for k in ("kafka_round_trip", "step_overhead", "throughput", "recovery"))
    inf, tri = results.get("inference", {}), results.get("triage", {})
    lines = [f"Measured by `make bench` on {results['machine']} at {results['when']} (embedded stack: tansu "
             f"broker, Redis 8.2, Ray Serve; fetch.wait.max.ms {results.get('fetch_wait_ms', 10)}).", "",
             "| what | figure |", "| --- | --- |"]
    if rt:
        lines.append(f"| raw Kafka request/reply round trip (the floor) | p50 {rt['p50_ms']:.1f} ms, "
                     f"p99 {rt['p99_ms']:.1f} ms |")
    if so:
        lines.append(f"| orchestration overhead per step (no-op tool, policy check, state save) | p50 "
                     f"{so['p50_ms']:.1f} ms ({so['p50_vs_round_trip']:.2f}x the round trip), p99 {so['p99_ms']:.1f} ms "
                     f"({so['p99_vs_round_trip']:.2f}x); targets 1.5x and 3x |")
    if tp:
        lines.append(f"| throughput, 3-step workflow, {tp['concurrency']} runs in flight | {tp['runs_per_s']:.1f} "
                     f"runs/s, {tp['steps_per_s']:.1f} steps/s |")
    if rc:
        lines.append(f"| recovery after kill -9 of the planner at {rc['rate_per_s']} runs/s | runs move again after "
                     f"{rc['seconds_until_runs_move']:.1f} s; lost runs {rc['lost_runs']}, duplicated effects "
                     f"{rc['duplicated_effects']} ({rc['refunds']} refunds, {rc['notifications']} notifications) |")
    lines += render_inference(inf, tri)
    from tools.bench import pii_bench

    lines += pii_bench.render(results.get("pii", {}))
    from tools.bench import policy_bench

    lines += policy_bench.render(results.get("policy", {}))
    if results.get("burst"):
        from tools.bench import burst_bench

        lines += burst_bench.render(results["burst"])
    dated = {part.get("measured_at") for part in (inf, tri) if part.get("measured_at")}
    if dated and dated != {results["when"]}:
        lines += ["", f"The inference and support triage rows were measured at {', '.join(sorted(dated))} "
                  "(`python -m tools.bench.run --only inference`)."]
    burst_at = results.get("burst", {}).get("measured_at")
    if burst_at and burst_at != results["when"]:
        lines += ["", f"The burst rows were measured at {burst_at} (`python -m tools.bench.run --only burst`)."]
    return "\n".join(lines) + "\n"


def render_inference(inf: dict[str, Any], tri: dict[str, Any]) -> list[str]:
    """Rows of the inference tiers and of triage, each against the same model in-process, same run."""
    lines = []
    if inf:
        ll, ht, base = inf["low_latency"], inf["high_throughput"], inf.get("baseline", {})
        load = inf.get("load_average_1m")
        busy = f" (1-minute load average {load['before']:.1f} before, {load['after']:.1f} after)" if load else ""
        for figure, via in ((ll, ll.get("path", "")), (ll.get("via_router"), "Serve's proxy and router, for comparison")):
            if not figure:
                continue
            where = f" through {via}" if via else ""
            lines.append(f"| inference low-latency tier{where}, one short text{busy} | p50 {figure['p50_ms']:.1f} ms, "
                         f"p95 {figure['p95_ms']:.1f} ms |")
            loaded = figure.get("under_bulk_load")
            if loaded and "p95_minus_in_process_ms" in figure:
                gap = figure["p95_minus_in_process_ms"]
                lines.append(f"| inference low-latency tier{where} while the high-throughput tier is loaded "
                             f"({loaded['bulk_load']['texts_per_s']:.0f} texts/s) vs in-process single call | p50 "
                             f"{loaded['p50_ms']:.1f} ms, p95 {loaded['p95_ms']:.1f} ms vs in-process p95 "
                             f"{figure['in_process_p95_ms']:.1f} ms: {gap:+.1f} ms"
                             + (f" ({_verdict(gap <= 10.0)} the <= +10 ms goal) |" if figure is ll else " |"))
        if "vs_in_process_ceiling" in ht:
            ratio = ht["vs_in_process_ceiling"]
            lines.append(f"| inference high-throughput tier ({ht['concurrency']} callers, {ht['texts_per_request']}-text "
                         f"requests) vs the in-process batched ceiling | {ht['texts_per_s']:.0f} texts/s vs "
                         f"{base['batched_ceiling']['texts_per_s']:.0f} texts/s = {ratio:.0%} ({_verdict(ratio >= 0.9)} "
                         f"the >= 90% goal); {ht['speedup_vs_unbatched']:.2f}x one-text-per-call in-process "
                         f"({base['unbatched']['texts_per_s']:.0f} texts/s) |")
            if "cpu_efficiency_vs_in_process" in ht:
                lines.append(f"| inference high-throughput tier, CPU per text (every serving process and the client) "
                             f"vs the model alone | {ht['cpu_efficiency_vs_in_process']:.0%} of the model's own "
                             "efficiency (less moved by other load on the box than the rates) |")
            single = ht.get("single_text_requests")
            if single:
                lines.append(f"| inference high-throughput tier, {single['concurrency']} callers of one text each | "
                             f"{single['texts_per_s']:.0f} texts/s (HTTP per text dominates) |")
        elif base:  # results written before the ceiling was measured side by side
            lines.append(f"| inference high-throughput tier (dynamic batching) vs unbatched | {ht['texts_per_s']:.0f} "
                         f"texts/s vs {base['unbatched']['texts_per_s']:.0f} texts/s unbatched in-process = "
                         f"{ht['speedup_vs_unbatched']:.2f}x; in-process batched ceiling "
                         f"{base['batched_ceiling']['texts_per_s']:.0f} texts/s |")
    if tri:
        lines.append(f"| support triage, {tri['messages']:.0f} held-out messages, whole mesh | "
                     f"{tri['mesh_messages_per_s']:.1f} messages/s, intent accuracy {tri['mesh_accuracy']:.1%}, "
                     f"p50 run {tri['mesh_p50_run_ms']:.0f} ms |")
        if "mesh_over_model" in tri:
            ratio = tri["mesh_over_model"]
            lines.append(f"| support triage, the model alone in-process (batched), same messages | "
                         f"{tri['model_in_process_messages_per_s']:.1f} messages/s, accuracy "
                         f"{tri['model_in_process_accuracy']:.1%}; mesh / model = {ratio:.0%} "
                         f"({_verdict(ratio >= 0.8)} the >= 80% goal), same accuracy: "
                         f"{'yes' if tri['same_accuracy'] else 'no'}{_triage_load(tri)} |")
            seen = tri.get("inference_batches", {}).get("bulk_requests")
            if seen:
                lines.append(f"| support triage, what reached the model | planner classify requests: {seen['calls']}, "
                             f"{seen['mean_texts_per_call']:.1f} texts each on average; bulk model calls: "
                             f"{tri['inference_batches']['bulk_model_calls']['calls']}; recall embeds answered "
                             f"from the router's cache: {tri['inference_batches']['embedding_cache_hits']} |")
        lines.append(f"| support triage, calling the model through the service (bulk tier, 64 per request) | "
                     f"{tri['model_direct_messages_per_s']:.1f} messages/s, accuracy {tri['model_direct_accuracy']:.1%} |")
    return lines


def _triage_load(tri: dict[str, Any]) -> str:
    load = tri.get("load_average_1m")
    if not load:
        return ""
    return (f"; 1-minute load average {load['before_model']:.1f} before the model, {load['before_mesh']:.1f} "
            f"before the mesh")


def _verdict(met: bool) -> str:
    return "meets" if met else "misses"


def render_peers(results: dict[str, Any]) -> str:
    """The Peers section (`make bench-peers`, tools/bench/peers.py): DBOS on PostgreSQL vs the mesh."""
    peers = results.get("peers")
    if not peers or not peers.get("points"):
        return ""
    setup, pg = peers.get("setup", {}), peers.get("setup", {}).get("postgres", {})
    goal = peers.get("goal_mesh_over_dbos", 2.0)
    dbos_name = setup.get("dbos", "dbos").split(" (")[0]
    lines = ["## Peers: DBOS on PostgreSQL vs the mesh", "",
             f"Measured by `make bench-peers` on {peers.get('machine', '?')} at {peers.get('when', '?')}, in one run: "
             f"{setup.get('order', '')}. The same 3-step no-op workflow at the same concurrency on both sides; "
             f"goal: mesh >= {goal:g}x DBOS runs/s.", "",
             f"| workload | {dbos_name}, PostgreSQL {pg.get('server_version', '?')} (fsync {pg.get('fsync', '?')}, "
             f"synchronous_commit {pg.get('synchronous_commit', '?')}) | mesh (embedded stack) | mesh / DBOS |",
             "| --- | --- | --- | --- |"]

    def cell(p: dict[str, Any]) -> str:
        return f"{p['runs_per_s']:.1f} runs/s, p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms"

    for row in peers["points"]:
        what = (f"closed loop, {row['concurrency']} clients" if row["mode"] == "closed loop"
                else f"burst: {row['concurrency']} runs started at once")
        r = row.get("mesh_over_dbos")
        verdict = "n/a" if r is None else f"{r:.2f}x ({'meets' if r >= goal else 'below'} the {goal:g}x goal)"
        lines.append(f"| {what} | {cell(row['dbos'])} | {cell(row['mesh'])} | {verdict} |")
    rec = peers.get("dbos_recovery")
    if rec and rec.get("seconds_until_runs_move") is not None:
        rc = results.get("recovery", {})
        mesh_rec = (f"planner kill -9: runs move again after {rc['seconds_until_runs_move']:.1f} s (`make bench`)"
                    if rc.get("seconds_until_runs_move") is not None else "see `make bench`")
        all_s = rec.get("seconds_until_all_recovered")
        lines.append(f"| recovery after kill -9 ({rec['runs']} runs in flight) | runs move again after "
                     f"{rec['seconds_until_runs_move']:.1f} s, all done after "
                     f"{(all_s if all_s is not None else float('nan')):.1f} s; lost runs {rec['lost_runs']}, "
                     f"{rec['steps_executed_after_crash']} steps executed after the crash | {mesh_rec} | |")
    lines += _cpu_lines(peers)
    lines += ["", f"DBOS: {setup.get('dbos_client', '')}. PostgreSQL: a cluster of the bench's own, initdb in a temp "
              f"dir, on 127.0.0.1, run as {pg.get('run_as', '?')}. Mesh: {setup.get('mesh', '')}."]
    load = setup.get("load_average_1m")
    if load:
        lines.append("")
        lines.append(f"1-minute load average (2 cores, shared machine): {load['before_dbos']:.1f} before DBOS, "
                     f"{load['before_mesh']:.1f} before the mesh, {load['after_mesh']:.1f} after.")
    return "\n".join(lines) + "\n"


def _cpu_lines(peers: dict[str, Any]) -> list[str]:
    """Where a run's CPU goes on each side, at the headline point (tools/bench/cpu.py, from /proc)."""
    cpu_d, cpu_m = (peers.get(side, {}).get("cpu_ms_per_run") for side in ("dbos", "mesh"))
    if not cpu_d or not cpu_m:
        return []

    def parts(c: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])
                         if not k.startswith("total"))

    ratio = peers.get("mesh_cpu_per_run_over_dbos")
    with_client = (f"; {cpu_m['total_with_client']:.1f} with the bench client, like DBOS's figure"
                   if "total_with_client" in cpu_m else "")
    return ["", f"CPU per run at {peers.get('concurrency')} clients (ms, user + system, from /proc, each part with "
            f"its child processes): DBOS {cpu_d['total']:.1f} ({parts(cpu_d)}; its process includes the client "
            f"threads); mesh {cpu_m['total']:.1f} ({parts(cpu_m)}; the bench client is not in the total{with_client})"
            + (f": {ratio:.1f}x DBOS's" if ratio else "") + ". On 2 cores, runs/s cannot exceed 2,000 / (CPU ms per "
            f"run): {2000 / cpu_d['total']:.0f} for DBOS, {2000 / cpu_m['total']:.0f} for the mesh."]


def write_report(results: dict[str, Any]) -> None:
    """docs/benchmarks.md from results.json: the main table, then the Peers section when measured."""
    parts = ["# Benchmarks\n"]
    if "machine" in results:
        parts.append(render(results))
    peers = render_peers(results)
    if peers:
        parts.append(peers)
    before_after = render_before_after()
    if before_after:
        parts.append(before_after)
    REPORT.write_text("\n".join(parts))


def render_before_after() -> str:
    """The last ``python -m tools.bench.compare`` (bench/before_after.json): an earlier revision and this
    tree, back to back in one run."""
    path = REPO_ROOT / "bench" / "before_after.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    lines = [f"## Before/after ({data['before']} vs {data['after']}, back to back at {data['when']})\n",
             "`python -m tools.bench.compare --before REV` runs the orchestration bench of both trees in one "
             "run on the same machine; compare the ratios, not absolute times.\n",
             "| figure | before | after | after / before |", "| --- | --- | --- | --- |"]
    for row in data["rows"]:
        cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {row['figure']} | {cell(row['before'])} | {cell(row['after'])} | "
                     f"{cell(row['after_over_before'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.run")
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--only", choices=["orchestration", "inference", "triage", "pii", "policy", "burst"],
                        default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}",
                               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "fetch_wait_ms": 10}
    if args.only in (None, "orchestration"):
        orchestration(results, args.quick)
    if args.only in (None, "inference", "triage"):
        inference(results, args.quick, tiers=args.only != "triage")
    if args.only in (None, "pii"):
        from tools.bench import pii_bench

        results["pii"] = pii_bench.run()
    if args.only in (None, "policy"):
        from tools.bench import policy_bench

        results["policy"] = policy_bench.run(quick=args.quick)
    if args.only in (None, "burst"):
        burst(results, args.quick)
    RESULTS.parent.mkdir(exist_ok=True)
    if RESULTS.exists():
        # Read-modify-write: keys this run did not measure (the other part with --only, the peers of
        # `make bench-peers`, with their own date) stay as they were. The table's date is the
        # orchestration rows' (the others carry their own): kept unless this run measured them.
        old = json.loads(RESULTS.read_text())
        if args.only not in (None, "orchestration") and "when" in old:
            results["when"] = old["when"]
        results = {**old, **results}
    RESULTS.write_text(json.dumps(results, indent=2))
    table = render(results)
    write_report(results)
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    block = f"<!-- bench:start -->\n{table}<!-- bench:end -->"
    text = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->", lambda _: block, text, flags=re.S)
    readme.write_text(text.replace("BENCH_PLACEHOLDER", block))
    print("\n" + table)
    print(f"written: {RESULTS.relative_to(REPO_ROOT)}, {REPORT.relative_to(REPO_ROOT)}, README.md")
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
