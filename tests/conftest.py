"""Shared fixtures: the real embedded broker and Redis on fresh ports, one per
test session (they start in milliseconds), with a unique topic prefix per test
so tests never see each other's records."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from infra.stack import Ports, Stack

if TYPE_CHECKING:
    from tests.integration.test_delivery_contract import Wiring


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker and Redis for the session; stopped by PID at the end."""
    # auth=False: servers these tests build in-process serve plaintext without tokens (AIOS_GRPC_AUTH=none);
    # tests of authentication and authorization build theirs with explicit credentials.
    stack = Stack(Ports.fresh(), run_dir=Path(tmp_path_factory.mktemp("stack")), topic_prefix="t.", auth=False)
    try:
        stack.start_broker()
        stack.start_redis()
        yield stack
    finally:
        stack.down()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def mesh_env(infra: Stack, prefix: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AIOS_* environment pointing at the session's broker and Redis, with this test's topic prefix;
    the catalog's topics are created."""
    infra.topic_prefix = prefix
    env = {k: v for k, v in infra.env().items() if k.startswith("AIOS_")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    infra.ensure_topics()
    return env


@pytest.fixture
def wiring(mesh_env: dict[str, str], prefix: str) -> Iterator[Wiring]:
    """Catalog, codec, producer and consumer loops of one test on the session's broker; loops stopped after."""
    from tests.integration.test_delivery_contract import Wiring  # a test module that imports this one

    w = Wiring(mesh_env, prefix)
    yield w
    w.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05,
             message: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


@contextmanager
def topic_from_start(bootstrap: str, topic: str, group: str) -> Iterator[Consumer]:
    """A consumer of every partition of ``topic`` from its first record, in its own ``group``, committing
    nothing; closed after."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "fetch.wait.max.ms": 10})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        yield consumer
    finally:
        consumer.close()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# In-process servers and clients of tests that do not opt in run without gRPC authentication (the
# settings' default is mtls, which needs credentials); stacks of whole services get theirs from Stack.env().
os.environ.setdefault("AIOS_GRPC_AUTH", "none")


@contextmanager
def services_up(run_dir: Path, *, topic_prefix: str, tenant: str, workflows: dict[str, str] | None = None,
                policies: dict[str, str] | None = None, inference: bool = False,
                planner_standbys: int | None = None) -> Iterator[Stack]:
    """Broker, Redis, sandbox and the five services on fresh ports, with the test's own workflow and
    policy files (name -> YAML) when it brings any, and ``planner_standbys`` hot-standby planners
    (None: Stack's default); stopped after, and no process may outlive it."""
    st = Stack(Ports.fresh(), run_dir=run_dir, topic_prefix=topic_prefix, tenant=tenant,
               planner_standbys=planner_standbys)
    with pytest.MonkeyPatch.context() as mp:
        for setting, folder, files in (("AIOS_PLANNER_WORKFLOW_DIR", "workflows", workflows),
                                       ("AIOS_POLICY_DIR", "policies", policies)):
            if files:
                (run_dir / folder).mkdir()
                for name, text in files.items():
                    (run_dir / folder / name).write_text(text)
                mp.setenv(setting, str(run_dir / folder))  # Stack.env() copies os.environ
        try:
            st.up(inference=inference)
            yield st
        finally:
            st.down()
            assert not [p for p in st.procs.values() if p.alive()]
