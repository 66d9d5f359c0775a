"""The planner's composition root."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from aiosmesh.v1 import workflow_pb2_grpc
from services.common.runtime import ServiceRuntime
from services.common.settings import MeshSettings, load_settings
from services.common.uow import RedisUnitOfWork
from services.planner.grpc_api import WorkflowApi
from services.planner.handlers import Admission, Planner
from services.planner.intents import BackgroundIntents
from services.planner.ports import IntentClassifier, PolicyGateway
from services.planner.store import RedisDefinitions, RunQueries, RunStore
from services.planner.timers import TimerPoller
from services.planner.workflows import WORKFLOW_DIR, Registry


class PlannerSettings(MeshSettings):
    planner_metrics_port: int = Field(9101, ge=0, le=65535)
    planner_workflow_dir: Path = Field(WORKFLOW_DIR, description="directory of workflow YAML files")
    planner_batch_size: int = Field(64, ge=1, le=1000)
    planner_timer_interval_ms: int = Field(50, ge=5, le=10000)
    default_tenant: str = Field("demo")
    planner_max_in_flight_per_tenant: int = Field(256, ge=0, description="runs in flight (created, not ended) per "
                                                  "tenant before new ingress waits; 0 = no limit")
    planner_max_in_flight_per_workflow: int = Field(0, ge=0, description="the same per tenant and workflow; 0 = "
                                                    "no limit")
    planner_classify_in_background: bool = Field(True, description="classify support messages in background "
                                                 "threads; messages wait (partition paused) until their intent "
                                                 "is ready instead of the consumer loop waiting for the model")
    planner_retention_s: int = Field(7 * 24 * 3600, ge=60, description="how long an ended run's state and the "
                                     "dedupe markers of its events are kept (seconds); keep it >= the topics' "
                                     "retention so a replayed record is still recognised")


def bootstrap(settings: PlannerSettings) -> ServiceRuntime:
    rt = ServiceRuntime("planner", settings, metrics_port=settings.planner_metrics_port)
    rt.ensure_topics()
    registry = Registry.from_dir(settings.planner_workflow_dir)
    runs = RunStore(RedisUnitOfWork(rt.redis), retention_s=settings.planner_retention_s)
    queries = RunQueries(rt.redis, retention_s=settings.planner_retention_s)
    policy = PolicyGateway(settings.policy_addr)
    classifier: IntentClassifier | BackgroundIntents = IntentClassifier(settings.inference_url)
    if settings.planner_classify_in_background:
        classifier = BackgroundIntents(classifier)
        rt.on_stop(classifier.close)
    planner = Planner(runs=runs, definitions=RedisDefinitions(rt.redis), registry=registry, publisher=rt.producer,
                      policy=policy, classifier=classifier,
                      admission=Admission(settings.planner_max_in_flight_per_tenant,
                                          settings.planner_max_in_flight_per_workflow))
    api = WorkflowApi(store=queries, registry=registry, producer=rt.producer, policy=policy,
                      default_tenant=settings.default_tenant)
    rt.serve(settings.planner_addr, [(workflow_pb2_grpc.add_WorkflowServiceServicer_to_server, api,
                                      "aiosmesh.v1.WorkflowService")])
    loop = rt.consume("planner", ["ingress", "commands", "step_results"], planner.handle,
                      batch_size=settings.planner_batch_size)
    # A hot standby fires no timers: only the group's member (the lease holder) does.
    gate = loop.gate
    poller = TimerPoller(queries, rt.producer, interval_s=settings.planner_timer_interval_ms / 1000,
                         active=gate.active if gate is not None else None).start()
    rt.on_stop(poller.stop)
    return rt


def main() -> None:
    bootstrap(load_settings(PlannerSettings)).run_until_stopped()
