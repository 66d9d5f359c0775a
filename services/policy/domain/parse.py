"""Policy files -> domain objects, once at start-up. Every mistake is a
ConfigError naming the file and the path inside it (``rules[2].when.amount_gt``),
because a policy that silently means something else is worse than none."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from services.common.errors import ConfigError
from services.policy.domain.model import (
    ACTIONS,
    ALLOW,
    MASK_PATTERNS,
    MATCH_FIELDS,
    REQUIRE_APPROVAL,
    SEVERITY,
    THRESHOLD_KEYS,
    WINDOWS,
    BudgetSpec,
    Match,
    PiiSpec,
    PolicyFile,
    PolicySet,
    Rule,
    Thresholds,
)

_TOP_KEYS = {"id", "version", "description", "default_effect", "budgets", "rules", "pii"}
_RULE_KEYS = {"id", "match", "unless", "when", "effect", "role", "reason", "description"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _At:
    """Where we are in a file, for error messages."""

    def __init__(self, source: str, path: str = "") -> None:
        self.source, self.path = source, path

    def __truediv__(self, part: str | int) -> _At:
        sub = f"[{part}]" if isinstance(part, int) else (f".{part}" if self.path else part)
        return _At(self.source, self.path + sub)

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path or '<top>'}: {message}")


def _mapping(value: Any, at: _At, allowed: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise at.fail(f"expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise at.fail(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _text(value: Any, at: _At, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise at.fail(f"expected a non-empty string, got {value!r}")
    return value


def _number(value: Any, at: _At) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise at.fail(f"expected a number, got {value!r}")
    return float(value)


def _identifier(value: Any, at: _At) -> str:
    text = _text(value, at)
    if not _ID.match(text):
        raise at.fail(f"{text!r} is not a valid id (letters, digits, '_', '.', '-')")
    return text


def _match(value: Any, at: _At) -> Match:
    spec = _mapping(value, at, set(MATCH_FIELDS))
    patterns: list[tuple[str, tuple[str, ...]]] = []
    for name in MATCH_FIELDS:
        if name not in spec:
            continue
        raw = spec[name]
        globs = [raw] if isinstance(raw, str) else raw
        if not isinstance(globs, list) or not globs:
            raise (at / name).fail("expected a glob pattern or a non-empty list of them")
        texts = tuple(_text(g, at / name / i) for i, g in enumerate(globs))
        if name == "action":
            # A literal action name that no caller sends is a typo that would never match.
            typos = [g for g in texts if not any(c in g for c in "*?[") and g not in ACTIONS]
            if typos:
                raise (at / name).fail(f"unknown action(s) {typos}; actions are {sorted(ACTIONS)}")
        patterns.append((name, texts))
    return Match(tuple(patterns))


def _thresholds(value: Any, at: _At) -> Thresholds:
    spec = _mapping(value, at, set(THRESHOLD_KEYS))
    bounds = []
    for key, raw in spec.items():
        attr, op = THRESHOLD_KEYS[key]
        bounds.append((attr, op, _number(raw, at / key)))
    return Thresholds(tuple(bounds))


def _rule(value: Any, at: _At, ref: str) -> Rule:
    spec = _mapping(value, at, _RULE_KEYS)
    rule_id = _identifier(spec.get("id"), at / "id")
    effect = spec.get("effect")
    if effect not in SEVERITY:
        raise (at / "effect").fail(f"expected one of {sorted(SEVERITY)}, got {effect!r}")
    role = _text(spec.get("role"), at / "role", required=False)
    if effect == REQUIRE_APPROVAL and not role:
        raise (at / "role").fail("a require_approval rule must name the role that approves")
    return Rule(id=rule_id, effect=str(effect), policy_ref=ref,
                match=_match(spec.get("match", {}), at / "match"),
                unless=_match(spec["unless"], at / "unless") if "unless" in spec else None,
                when=_thresholds(spec.get("when", {}), at / "when"),
                role=role, reason=_text(spec.get("reason"), at / "reason", required=False).strip())


def _budgets(value: Any, at: _At, ref: str) -> dict[str, BudgetSpec]:
    out = {}
    for tenant, raw in _mapping(value, at).items():
        where = at / str(tenant)
        spec = _mapping(raw, where, {"limit", "window"})
        limit = _number(spec.get("limit"), where / "limit")
        if limit < 0:
            raise (where / "limit").fail("a budget limit cannot be negative")
        window = spec.get("window", "day")
        if window not in WINDOWS:
            raise (where / "window").fail(f"expected one of {list(WINDOWS)}, got {window!r}")
        out[str(tenant)] = BudgetSpec(limit=limit, window=str(window), policy_ref=ref)
    return out


def _pii(value: Any, at: _At) -> PiiSpec:
    spec = _mapping(value, at, {"mask_fields", "mask_patterns", "tokenize_fields"})
    fields = spec.get("mask_fields", [])
    patterns = spec.get("mask_patterns", [])
    tokenized = spec.get("tokenize_fields", [])
    for key, items in (("mask_fields", fields), ("mask_patterns", patterns), ("tokenize_fields", tokenized)):
        if not isinstance(items, list):
            raise (at / key).fail("expected a list")
        for i, item in enumerate(items):
            _text(item, at / key / i)
    unknown = [p for p in patterns if p not in MASK_PATTERNS]
    if unknown:
        raise (at / "mask_patterns").fail(f"unknown pattern(s) {unknown}; known: {list(MASK_PATTERNS)}")
    both = sorted({str(f).lower() for f in fields} & {str(f).lower() for f in tokenized})
    if both:
        raise (at / "tokenize_fields").fail(f"{both} also listed in mask_fields; a field is either masked or "
                                            "tokenized (tokenize what a connector needs, mask the rest)")
    return PiiSpec(frozenset(str(f).lower() for f in fields), tuple(str(p) for p in patterns),
                   frozenset(str(f).lower() for f in tokenized))


def parse_policy_file(data: Any, source: str) -> PolicyFile:
    """One parsed YAML document -> PolicyFile, or ConfigError naming source and path."""
    at = _At(source)
    spec = _mapping(data, at, _TOP_KEYS)
    file_id = _identifier(spec.get("id"), at / "id")
    version = spec.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise (at / "version").fail(f"expected a positive integer, got {version!r}")
    ref = f"{file_id}@v{version}"
    raw_rules = spec.get("rules", [])
    if not isinstance(raw_rules, list):
        raise (at / "rules").fail("expected a list of rules")
    rules = tuple(_rule(r, at / "rules" / i, ref) for i, r in enumerate(raw_rules))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.id in seen:
            raise (at / "rules" / i / "id").fail(f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
    default_effect = spec.get("default_effect", ALLOW)
    if default_effect not in SEVERITY:
        raise (at / "default_effect").fail(f"expected one of {sorted(SEVERITY)}, got {default_effect!r}")
    return PolicyFile(id=file_id, version=version, source=source, rules=rules,
                      budgets=_budgets(spec.get("budgets", {}), at / "budgets", ref),
                      pii=_pii(spec.get("pii", {}), at / "pii"), default_effect=str(default_effect))


def combine(files: Sequence[PolicyFile]) -> PolicySet:
    """Merge files: all rules apply, PII settings add up, the strictest default
    wins; two files budgeting the same tenant is ambiguous and refused."""
    if not files:
        raise ConfigError("no policy files: add at least one policies/*.yaml (see policies/default.yaml)")
    ids: dict[str, str] = {}
    budgets: dict[str, BudgetSpec] = {}
    budget_sources: dict[str, str] = {}
    fields: set[str] = set()
    patterns: list[str] = []
    tokenized: set[str] = set()
    for f in files:
        if f.id in ids:
            raise ConfigError(f"{f.source}: id: policy id {f.id!r} is also used by {ids[f.id]}")
        ids[f.id] = f.source
        for tenant, spec in f.budgets.items():
            if tenant in budgets:
                raise ConfigError(f"{f.source}: budgets.{tenant}: also budgeted in {budget_sources[tenant]}")
            budgets[tenant], budget_sources[tenant] = spec, f.source
        fields |= f.pii.mask_fields
        tokenized |= f.pii.tokenize_fields
        patterns += [p for p in f.pii.mask_patterns if p not in patterns]
    strictest = max(files, key=lambda f: SEVERITY[f.default_effect])
    return PolicySet(files=tuple(files), rules=tuple(r for f in files for r in f.rules), budgets=budgets,
                     pii=PiiSpec(frozenset(fields - tokenized), tuple(patterns), frozenset(tokenized)),
                     default_effect=strictest.default_effect,
                     default_ref=strictest.ref)
