"""In-memory twins of the planner's ports, for millisecond handler tests: the
run store on the in-memory unit of work, a policy that counts what it was
asked, and a publisher that encodes through the real producer's one
``encode`` (so records are the real Avro bytes) but keeps them in a list."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import InvalidArgument
from services.common.kafka import Inbound, MeshProducer, OutRecord
from services.common.uow import MemoryUnitOfWork
from services.planner.domain.state import CheckPolicy, RunState, Verdict
from services.planner.domain.workflow import WorkflowDef, build
from services.planner.handlers import Planner
from services.planner.ports import Settlement
from services.planner.store import MemoryDefinitions, RunStore
from services.planner.workflows import Registry
from tests.unit.engine_driver import ALLOW


class RecordingPublisher(MeshProducer):
    """The real encode path; sending only records (no broker)."""

    def __init__(self) -> None:
        catalog = Catalog("t.")
        super().__init__("127.0.0.1:1", catalog, AvroCodec(catalog.schemas))
        self.sent: list[OutRecord] = []
        self.fail_sends = 0

    def send_record(self, rec: OutRecord) -> None:
        if self.fail_sends:
            self.fail_sends -= 1
            raise RuntimeError("broker gone")
        self.sent.append(rec)

    def flush(self, timeout_s: float = 30.0) -> None:
        return None

    def decoded(self, role: str) -> list[dict[str, Any]]:
        topic = self.catalog.topic(role)
        return [self.codec.decode(r.value)[1] for r in self.sent if r.topic == topic]

    def inbound(self, role: str, key: str, record: dict[str, Any], offset: int = 0) -> Inbound:
        """A record as the consumer loop hands it to a handler: encoded, then decoded."""
        out = self.encode(role, key, record)
        schema, value = self.codec.decode(out.value)
        return Inbound(topic=out.topic, role=role, partition=0, offset=offset, key=key, schema=schema, value=value,
                       headers=out.headers, idempotency_key=out.event_id)


@dataclass
class CountingPolicy:
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # by tool
    evaluated: list[tuple[str, str]] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)
    reconciled: list[tuple[str, str, float]] = field(default_factory=list)
    traces: list[dict[str, str]] = field(default_factory=list)  # the trace context given with each check

    def may_start(self, tenant: str, principal: str, workflow: str, run_id: str, inputs: Any = None) -> Verdict:
        self.starts.append(run_id)
        return ALLOW if inputs is None else replace(ALLOW, inputs=self.mask_many([(tenant, inputs)])[0], masked=True)

    calls: int = 0

    def may_start_many(self, checks: list[tuple[str, str, str, str]],
                       traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]:
        self.calls += 1
        self.traces += [dict(t) for t in traces]
        return [self.may_start(*c) for c in checks]

    def evaluate_many(self, checks: list[tuple[RunState, CheckPolicy]],
                      traces: Sequence[Mapping[str, str]] = ()) -> list[Verdict]:
        self.calls += 1
        self.traces += [dict(t) for t in traces]
        self.evaluated += [(run.run_id, check.step_id) for run, check in checks]
        self.rechecked += [(run.run_id, check.step_id) for run, check in checks if getattr(check, "recheck", False)]
        return [self.verdicts.get(f"{check.tool}:recheck" if getattr(check, "recheck", False) else check.tool, ALLOW)
                for _run, check in checks]

    def mask_many(self, items: list[tuple[str, Any]]) -> list[Any]:
        return [value for _tenant, value in items]  # no pii block: values pass as they are

    refuse: set[str] = field(default_factory=set)  # tenants whose settlements policy refuses for good
    settle_calls: int = 0
    rechecked: list[tuple[str, str]] = field(default_factory=list)  # budget re-checks of approved steps

    def _refusal(self, tenant: str, actual_cost: float) -> str:
        if tenant in self.refuse:
            return f"NotFound: no budget is configured for tenant {tenant!r}"
        if not math.isfinite(actual_cost) or actual_cost < 0:
            return f"InvalidArgument: actual_cost must be a finite number >= 0, got {actual_cost}"
        return ""

    def reconcile(self, tenant: str, run_id: str, step_id: str, actual_cost: float) -> None:
        """One settlement per call, refusing as the real gateway does (InvalidArgument)."""
        self.settle_calls += 1
        if error := self._refusal(tenant, actual_cost):
            raise InvalidArgument(error)
        self.reconciled.append((run_id, step_id, actual_cost))

    def reconcile_many(self, items: list[Settlement], traces: Sequence[Mapping[str, str]] = ()) -> list[str]:
        self.settle_calls += 1
        errors = [self._refusal(s.tenant, s.cost) for s in items]
        self.reconciled += [(s.run_id, s.step_id, s.cost) for s, e in zip(items, errors, strict=True) if not e]
        return errors


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@dataclass
class Mesh:
    planner: Planner
    uow: MemoryUnitOfWork
    runs: RunStore
    publisher: RecordingPublisher
    policy: CountingPolicy
    clock: Clock


def mesh(*defs: dict[str, Any]) -> Mesh:
    uow, publisher, policy, clock = MemoryUnitOfWork(), RecordingPublisher(), CountingPolicy(), Clock()
    runs = RunStore(uow)
    workflows: list[WorkflowDef] = [build(d) for d in defs]
    planner = Planner(runs=runs, definitions=MemoryDefinitions(), registry=Registry(workflows), publisher=publisher,
                      policy=policy, classifier=None, clock=clock)
    return Mesh(planner, uow, runs, publisher, policy, clock)
