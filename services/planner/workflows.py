"""Loads, validates and routes declarative workflows (``workflows/*.yaml``).

Several versions of one workflow may be deployed side by side; new runs take
the highest. Every definition a run starts on is snapshotted in Redis by
(name, version), so a planner that no longer has the version-1 file still
finishes version-1 runs on version 1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from services.common.catalog import REPO_ROOT
from services.common.errors import ConfigError, NotFound
from services.planner.domain.workflow import WorkflowDef, build, semantic_errors

SCHEMA = json.loads((REPO_ROOT / "schemas" / "workflow.schema.json").read_text())
WORKFLOW_DIR = REPO_ROOT / "workflows"


def validate(raw: Any, source: str = "<workflow>") -> list[str]:
    """Every error in a workflow document, each with its path in the file."""
    if not isinstance(raw, dict):
        return [f"{source}: a workflow file must be a YAML mapping with name, version and steps"]
    errors = []
    for err in sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw), key=lambda e: list(e.path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path).lstrip(".") or "(top)"
        errors.append(f"{source}: {path}: {err.message}")
    if not errors:
        errors += [f"{source}: {e}" for e in semantic_errors(raw)]
    return errors


def load_file(path: Path) -> WorkflowDef:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (offset {exc.start}); save the workflow as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    errors = validate(raw, str(path))
    if errors:
        raise ConfigError("invalid workflow:\n  " + "\n  ".join(errors))
    return build(raw)


@dataclass(frozen=True)
class Route:
    workflow: str | None
    reason: str


class Registry:
    """Every deployed workflow version, plus routing of ingress events to them."""

    def __init__(self, defs: list[WorkflowDef]) -> None:
        self._defs: dict[tuple[str, int], WorkflowDef] = {}
        for wf in defs:
            if (wf.name, wf.version) in self._defs:
                raise ConfigError(f"workflow {wf.ref} is defined twice")
            self._defs[(wf.name, wf.version)] = wf

    @classmethod
    def from_dir(cls, directory: Path = WORKFLOW_DIR) -> Registry:
        files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
        if not files:
            raise ConfigError(f"no workflow files (*.yaml) in {directory}")
        return cls([load_file(p) for p in files])

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._defs})

    def latest(self, name: str) -> WorkflowDef:
        versions = [v for (n, v) in self._defs if n == name]
        if not versions:
            raise NotFound(f"no workflow named {name!r}; deployed: {self.names()}")
        return self._defs[(name, max(versions))]

    def get(self, name: str, version: int) -> WorkflowDef | None:
        return self._defs.get((name, version))

    def add(self, wf: WorkflowDef) -> None:
        self._defs.setdefault((wf.name, wf.version), wf)

    def all_latest(self) -> list[WorkflowDef]:
        return [self.latest(n) for n in self.names()]

    def needs_intent(self, event_type: str) -> bool:
        return any(wf.trigger.get("event_type") == event_type and wf.trigger.get("intents")
                   for wf in self.all_latest())

    def route(self, event_type: str, intent: str | None) -> Route:
        """Pick the workflow for an ingress event: by intent first, then the type's default."""
        candidates = [wf for wf in self.all_latest() if wf.trigger.get("event_type") == event_type]
        if not candidates:
            return Route(None, f"no workflow is triggered by event type {event_type!r}; "
                               f"declare trigger.event_type in a workflow file")
        for wf in candidates:
            if intent and intent in (wf.trigger.get("intents") or []):
                return Route(wf.name, f"intent {intent} -> {wf.name}")
        for wf in candidates:
            if wf.trigger.get("default") or not wf.trigger.get("intents"):
                return Route(wf.name, f"intent {intent} has no dedicated workflow; default {wf.name}")
        return Route(None, f"no workflow for event type {event_type!r} and intent {intent!r}")
