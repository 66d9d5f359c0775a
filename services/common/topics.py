"""``python -m services.common.topics apply``: create the catalog's topics on any Kafka.

The Helm chart runs this as a hook Job before the services start, with the
cluster's replication factor and per-topic partition counts, instead of every
service creating topics at start-up with replication factor 1. It only ever
creates: an existing topic is reported, never altered, because adding
partitions to a topic moves keys to other partitions and breaks the per-run
ordering the mesh relies on (see the chart's UPGRADING.md)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from services.common.catalog import Catalog
from services.common.settings import MeshSettings, load_settings


class TopicSettings(MeshSettings):
    """AIOS_TOPICS_*: how the catalog's topics are created on this cluster."""

    topics_replication_factor: int = Field(1, ge=1, le=32, description="replication factor of created topics")
    topics_partitions: dict[str, int] = Field(
        default_factory=dict, description='per-role partition counts overriding the catalog, JSON: {"ingress": 12}')
    topics_config: dict[str, str] = Field(
        default_factory=dict, description='extra topic configs at creation, JSON: {"min.insync.replicas": "2"}')
    topics_timeout_s: float = Field(60.0, gt=0, le=600, description="deadline for reaching Kafka and creating")


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def plan(catalog: Catalog, settings: TopicSettings) -> list[TopicPlan]:
    """Every catalog topic as it should be created; unknown roles in the overrides are a config error."""
    unknown = sorted(set(settings.topics_partitions) - set(catalog.topics))
    if unknown:
        raise ValueError(f"AIOS_TOPICS_PARTITIONS names roles that are not in the catalog: {unknown}; "
                         f"known: {sorted(catalog.topics)}")
    bad = {role: n for role, n in settings.topics_partitions.items() if n < 1}
    if bad:
        raise ValueError(f"AIOS_TOPICS_PARTITIONS must be >= 1: {bad}")
    return [TopicPlan(name=spec.name, partitions=settings.topics_partitions.get(role, spec.partitions),
                      replication_factor=settings.topics_replication_factor,
                      config={"retention.ms": str(spec.retention_ms), **settings.topics_config})
            for role, spec in catalog.topics.items()]


def report(wanted: Sequence[TopicPlan], existing: Mapping[str, int]) -> tuple[list[TopicPlan], list[str]]:
    """The topics to create, and one line per topic that already exists."""
    missing = [t for t in wanted if t.name not in existing]
    lines = []
    for t in wanted:
        if t.name in existing:
            note = "" if existing[t.name] == t.partitions else \
                f" (wanted {t.partitions}; left unchanged: adding partitions moves keys)"
            lines.append(f"exists   {t.name}: {existing[t.name]} partitions{note}")
    return missing, lines


def _existing(admin: Any, deadline: float, bootstrap: str) -> dict[str, int]:
    while True:
        try:
            meta = admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            return {name: len(t.partitions) for name, t in meta.topics.items()}
        except Exception as exc:  # broker still starting, or a rollout of the brokers
            if time.monotonic() > deadline:
                raise SystemExit(f"topics: cannot reach Kafka at {bootstrap} within "
                                 f"AIOS_TOPICS_TIMEOUT_S: {exc}") from exc
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def apply(settings: TopicSettings, out: Any = sys.stdout) -> int:
    """Create the missing topics; 0 when every catalog topic exists afterwards."""
    from confluent_kafka.admin import AdminClient, NewTopic

    try:
        wanted = plan(Catalog(settings.topic_prefix), settings)
    except ValueError as exc:
        print(f"topics: {exc}", file=sys.stderr)
        return 2
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_client_config()})
    deadline = time.monotonic() + settings.topics_timeout_s
    missing, lines = report(wanted, _existing(admin, deadline, settings.kafka_bootstrap))
    for line in lines:
        print(line, file=out)
    if not missing:
        return 0
    # Keep `admin` alive until every future resolves: dropping it early cancels the requests.
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=t.replication_factor, config=t.config)
         for t in missing], operation_timeout=settings.topics_timeout_s)
    failed = 0
    for t in missing:
        try:
            futures[t.name].result(timeout=settings.topics_timeout_s)
            print(f"created  {t.name}: {t.partitions} partitions, replication factor {t.replication_factor}",
                  file=out)
        except Exception as exc:
            if "already exists" in str(exc).lower() or "TOPIC_ALREADY_EXISTS" in str(exc):
                print(f"exists   {t.name}: created concurrently", file=out)
                continue
            failed += 1
            print(f"topics: cannot create {t.name}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.topics",
                                     description="Create the catalog's topics (AIOS_KAFKA_*, AIOS_TOPICS_*).")
    parser.add_argument("command", choices=["apply"])
    parser.parse_args(argv)
    return apply(load_settings(TopicSettings))


if __name__ == "__main__":
    sys.exit(main())
