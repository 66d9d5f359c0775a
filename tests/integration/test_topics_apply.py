"""One way to create the catalog's topics, on the real embedded broker: `aios topics apply`, the
embedded stack's ensure_topics and the chart's Job (`python -m services.common.topics apply`) all
run services.common.topics, so all honour AIOS_TOPICS_*."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from infra.stack import Stack
from services.common.catalog import Catalog
from tools.aios.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _topics(bootstrap: str, prefix: str) -> dict[str, int]:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in meta.topics.items() if name.startswith(prefix)}


def _expected(prefix: str, **overrides: int) -> dict[str, int]:
    catalog = Catalog(prefix)
    return {spec.name: overrides.get(role, spec.partitions) for role, spec in catalog.topics.items()}


def test_aios_topics_apply_creates_the_catalog_then_leaves_it_alone(
        infra: Stack, prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = infra.env()["AIOS_KAFKA_BOOTSTRAP"]
    monkeypatch.setenv("AIOS_RUN_DIR", str(tmp_path))  # never pick up a running demo stack
    monkeypatch.setenv("AIOS_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("AIOS_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("AIOS_TOPICS_PARTITIONS", '{"ingress": 6}')
    assert main(["topics", "apply"]) == 0
    assert _topics(bootstrap, prefix) == _expected(prefix, ingress=6)
    assert f"created  {prefix}ingress.events: 6 partitions" in capsys.readouterr().out
    monkeypatch.setenv("AIOS_TOPICS_PARTITIONS", '{"ingress": 8}')
    assert main(["topics", "apply"]) == 0
    assert _topics(bootstrap, prefix) == _expected(prefix, ingress=6)  # never altered: keys would move
    assert "left unchanged" in capsys.readouterr().out


def test_aios_topics_apply_refuses_an_unknown_role(
        infra: Stack, prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIOS_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("AIOS_KAFKA_BOOTSTRAP", infra.env()["AIOS_KAFKA_BOOTSTRAP"])
    monkeypatch.setenv("AIOS_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("AIOS_TOPICS_PARTITIONS", '{"ingres": 6}')
    assert main(["topics", "apply"]) == 2
    assert "ingres" in capsys.readouterr().err
    assert _topics(infra.env()["AIOS_KAFKA_BOOTSTRAP"], prefix) == {}


def test_the_embedded_stack_creates_topics_the_same_way(
        infra: Stack, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_TOPICS_PARTITIONS", '{"approvals": 5}')
    saved = infra.topic_prefix
    infra.topic_prefix = prefix
    try:
        infra.ensure_topics()
    finally:
        infra.topic_prefix = saved
    assert _topics(infra.env()["AIOS_KAFKA_BOOTSTRAP"], prefix) == _expected(prefix, approvals=5)
