"""The topics Job's command, run for real against the embedded Kafka-compatible
broker: it creates the catalog's topics with the configured partitions, is a
no-op the second time, and refuses a bad setting naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from confluent_kafka.admin import AdminClient

from infra.stack import Stack
from tests.chart import kube

pytestmark = [pytest.mark.timeout(120), pytest.mark.integration]


def run_topics(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
    return subprocess.run([sys.executable, "-m", "services.common.topics", "apply"], env={**clean, **env},
                          cwd=kube.REPO, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)


def test_topics_command_creates_the_catalog_on_a_real_broker(infra: Stack, prefix: str) -> None:
    bootstrap = infra.env()["AIOS_KAFKA_BOOTSTRAP"]
    env = {"AIOS_KAFKA_BOOTSTRAP": bootstrap, "AIOS_TOPIC_PREFIX": prefix, "AIOS_TOPICS_REPLICATION_FACTOR": "1",
           "AIOS_TOPICS_PARTITIONS": '{"ingress": 6}', "AIOS_TOPICS_TIMEOUT_S": "30"}
    first = run_topics(env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("created ") == 10, first.stdout
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    assert len(topics[f"{prefix}ingress.events"].partitions) == 6
    assert len(topics[f"{prefix}approval.requests"].partitions) == 2
    again = run_topics({**env, "AIOS_TOPICS_PARTITIONS": '{"ingress": 8}'})
    assert again.returncode == 0 and "created" not in again.stdout, again.stdout + again.stderr
    assert "wanted 8; left unchanged" in again.stdout, again.stdout


def test_topics_command_refuses_unknown_roles_and_bad_settings(infra: Stack, prefix: str) -> None:
    base = {"AIOS_KAFKA_BOOTSTRAP": infra.env()["AIOS_KAFKA_BOOTSTRAP"], "AIOS_TOPIC_PREFIX": prefix}
    unknown = run_topics({**base, "AIOS_TOPICS_PARTITIONS": '{"ingres": 6}'})
    assert unknown.returncode == 2 and "AIOS_TOPICS_PARTITIONS" in unknown.stderr, unknown.stderr
    bad = run_topics({**base, "AIOS_TOPICS_REPLICATION_FACTOR": "0"})
    assert bad.returncode == 2 and "AIOS_TOPICS_REPLICATION_FACTOR" in bad.stderr, bad.stderr
    sasl = run_topics({**base, "AIOS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert sasl.returncode == 2 and "AIOS_KAFKA_SASL_MECHANISM" in sasl.stderr, sasl.stderr
