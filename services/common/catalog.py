"""The topic catalog and the Avro schemas behind it, loaded from ``schemas/``.

One file names every topic (role, name, key, partitions, schema, retention);
topics are created from it explicitly, because a broker that auto-creates a
topic on first produce picks its own partition count and retention."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import ConfigError
from services.common.settings import MeshSettings

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "schemas"


@dataclass(frozen=True)
class TopicSpec:
    role: str
    name: str
    key: str
    partitions: int
    schema: str
    retention_ms: int


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, list[dict[str, Any]]]:
    """Every known schema by full name: the current version first, then the
    released versions kept in ``schemas/history/<Name>.v<N>.avsc``, newest first,
    so old records still decode. Each history entry carries its version number
    under ``aios_version`` (not part of the schema's fingerprint)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(schema_dir.glob("*.avsc")):
        schema = json.loads(path.read_text())
        found.setdefault(f"{schema['namespace']}.{schema['name']}", []).append(schema)
    for version, path in sorted(((history_version(p), p) for p in (schema_dir / "history").glob("*.avsc")),
                                reverse=True):
        schema = {**json.loads(path.read_text()), "aios_version": version}
        found.setdefault(f"{schema['namespace']}.{schema['name']}", []).append(schema)
    return found


def history_version(path: Path) -> int:
    """``WorkflowCommand.v3.avsc`` -> 3."""
    stem = path.stem
    if ".v" not in stem or not stem.rsplit(".v", 1)[1].isdigit():
        raise ConfigError(f"{path}: released schemas are named <Name>.v<N>.avsc")
    return int(stem.rsplit(".v", 1)[1])


class Catalog:
    """Topics by role, with the deployment's prefix applied."""

    def __init__(self, prefix: str, schema_dir: Path = SCHEMA_DIR) -> None:
        raw = yaml.safe_load((schema_dir / "catalog.yaml").read_text())
        self.prefix = prefix
        self.schemas = load_schemas(schema_dir)
        self.topics: dict[str, TopicSpec] = {}
        for role, spec in raw["topics"].items():
            if spec["schema"] not in self.schemas:
                raise ConfigError(f"catalog topic {role!r} names schema {spec['schema']!r}, "
                                  f"which has no .avsc file in {schema_dir}")
            self.topics[role] = TopicSpec(role=role, name=prefix + spec["name"], key=spec["key"],
                                          partitions=int(spec["partitions"]), schema=spec["schema"],
                                          retention_ms=int(spec["retention_ms"]))

    def topic(self, role: str) -> str:
        return self.spec(role).name

    def spec(self, role: str) -> TopicSpec:
        try:
            return self.topics[role]
        except KeyError:
            raise ConfigError(f"no topic with role {role!r} in the catalog; known: {sorted(self.topics)}") from None

    def role_of(self, topic: str) -> str | None:
        for spec in self.topics.values():
            if spec.name == topic:
                return spec.role
        return None

    def ensure_topics(self, settings: MeshSettings) -> None:
        """Create every catalog topic that does not exist yet, exactly as the chart's topics Job and
        ``aios topics apply`` do (``services.common.topics.apply``: partitions, replication factor and
        topic configs from AIOS_TOPICS_*, SASL/TLS from AIOS_KAFKA_*); ConfigError if it cannot."""
        from pydantic import ValidationError

        from services.common import topics  # imports this module: import it late

        try:
            job = settings if isinstance(settings, topics.TopicSettings) else topics.TopicSettings(
                **{name: getattr(settings, name) for name in MeshSettings.model_fields})
        except ValidationError as exc:  # AIOS_TOPICS_* from the environment
            raise ConfigError(f"invalid topic settings: {exc}") from None
        job = job.model_copy(update={"topic_prefix": self.prefix})
        report = io.StringIO()
        try:
            code = topics.apply(job, out=report)
        except SystemExit as exc:  # Kafka unreachable within AIOS_TOPICS_TIMEOUT_S
            raise ConfigError(str(exc.code)) from None
        lines = report.getvalue().splitlines()
        if code != 0:
            raise ConfigError(f"cannot create the catalog's topics at {job.kafka_bootstrap} (errors on stderr); "
                              f"done so far: {lines}")
        created = [line for line in lines if line.startswith("created")]
        if created:
            log.info("topics created", extra={"fields": {"topics": created}})
