"""Scale out is real: three planner and two executor replicas on the embedded
broker share every partition, and a burst of order-recovery events finishes
with each effect once per key. Replicas meet only in Kafka and Redis; nothing
in a process is shared state."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aiosmesh.v1 import workflow_pb2_grpc
from infra.stack import REPO, Stack, procs, wait_serving
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import MeshProducer
from tests.conftest import services_up, wait_for
from tools import chaos

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
N_RUNS = 200
TENANT = "shop"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with services_up(Path(tmp_path_factory.mktemp("scale")), topic_prefix="scale.", tenant=TENANT) as st:
        yield st


def start_replica(stack: Stack, service: str, index: int) -> int:
    """Another replica of ``service`` with its own instance id, gRPC and metrics ports; returns the metrics port."""
    env = stack.env()
    port, metrics_port = procs.free_port(), procs.free_port()
    env.update({"AIOS_INSTANCE_ID": f"{service}-{index}", f"AIOS_{service.upper()}_ADDR": f"127.0.0.1:{port}",
                f"AIOS_{service.upper()}_METRICS_PORT": str(metrics_port)})
    name = f"{service}-{index}"
    proc = procs.spawn(name, [sys.executable, "-m", f"services.{service}"], env=env, log_dir=stack.log_dir,
                       port=port, cwd=REPO)
    stack.procs[name] = proc  # stopped with the stack
    wait_serving(proc, timeout_s=90)
    return metrics_port


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def series(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``metric`` in a Prometheus text page, with its labels."""
    out = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line[len(metric) + 1:].rsplit("} ", 1)
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def assigned(text: str, service: str) -> set[tuple[str, str]]:
    """(topic, partition) this replica reports lag for: the partitions it owns."""
    return {(lb["topic"], lb["partition"]) for lb, _v in series(text, "aios_consumer_lag_records") if lb["service"] == service}


def handled(text: str, service: str) -> float:
    return sum(v for lb, v in series(text, "aios_records_total")
               if lb.get("service") == service and lb.get("outcome") == "ok")


def test_three_planners_and_two_executors_share_every_partition_and_a_burst_runs_once(stack: Stack) -> None:
    env = stack.env()
    planners = [int(env["AIOS_PLANNER_METRICS_PORT"]), *(start_replica(stack, "planner", i) for i in (1, 2))]
    executors = [int(env["AIOS_EXECUTOR_METRICS_PORT"]), start_replica(stack, "executor", 1)]
    catalog = Catalog(stack.topic_prefix)
    planner_topics = {catalog.topic(r) for r in ("ingress", "commands", "step_results")}

    def every_partition_served() -> bool:
        owned = [{(t, p) for t, p in assigned(scrape(port), "planner") if t in planner_topics} for port in planners]
        union = set().union(*owned)
        return all(owned) and len(union) == 12  # 4 partitions x 3 topics, each replica owning some

    wait_for(every_partition_served, timeout_s=90, interval_s=1, message="3 planner replicas owning all 12 partitions")

    orders = [o for o in chaos.make_orders(N_RUNS * 3, seed=11, bad_share=0.0) if o.refund_cents <= 10000][:N_RUNS]
    chaos.seed_sandbox(env["AIOS_SANDBOX_URL"], orders)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    sent = chaos.publish_orders(producer, orders, TENANT)  # all at once: a burst
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))

    def all_final() -> list:  # type: ignore[type-arg]
        runs = chaos.final_runs(stub, TENANT, set(sent), "order-recovery")
        return runs if len(runs) == len(orders) and all(r.status in chaos.FINAL for r in runs) else []

    runs = wait_for(all_final, timeout_s=240, interval_s=2, message=f"all {len(orders)} runs final")
    report = chaos.effect_report(env["AIOS_SANDBOX_URL"])
    print(f"\nscale-out: {len(runs)} runs, planner records {[handled(scrape(p), 'planner') for p in planners]}, "
          f"executor records {[handled(scrape(p), 'executor') for p in executors]}, effects {report['counts']}")
    assert {r.status for r in runs} == {"completed"}
    assert report["duplicates"] == {k: {} for k in report["duplicates"]}
    assert report["refund_keys"] == len(orders) and report["notification_keys"] == len(orders)
    assert all(handled(scrape(p), "planner") > 0 for p in planners), "a planner replica did no work"
    assert all(handled(scrape(p), "executor") > 0 for p in executors), "an executor replica did no work"
