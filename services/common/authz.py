"""What the caller may do: Cedar policies (``policies/authz.cedar``) checked
in-process by every service, against the principal the auth interceptor
verified (``services.common.auth``).

A servicer asks with one call before it touches data::

    grant = authz.require(context, "ReadMemory", tenant=request.tenant)
    store.recall(grant.tenant, ...)

``require`` resolves the tenant (the one the request names, else the
principal's own), evaluates the policies and returns the grant, or raises
``AccessDenied`` (PERMISSION_DENIED): a request naming a tenant the principal
does not act for is refused before anything is read. Without a principal
(a call that skipped the interceptor) it aborts UNAUTHENTICATED: fail closed.
Under ``AIOS_GRPC_AUTH=none`` the principal is ``ANONYMOUS`` and the request's
tenant stands as it did before authentication existed.

Policies are parsed once and validated against ``policies/authz.cedarschema``.
The file is re-checked at most every ``AIOS_AUTHZ_RELOAD_S`` seconds (a
``stat`` on the request path): a new version that parses and validates
replaces the old one; one that does not is refused, logged with its errors
and counted, and the previous set stays in force."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy
from prometheus_client import Counter

from services.common.auth import ANONYMOUS, Principal, current_principal
from services.common.errors import ConfigError, InvalidArgument, PolicyDenied

__all__ = ["ACTIONS", "AccessDenied", "Authorizer", "Decision", "Grant", "PolicyFileError", "Resource",
           "authorizer", "install", "require", "resource_for", "tenant_for"]

log = logging.getLogger(__name__)

# Every action the schema declares, and the resource type it takes (with or without a run id).
ACTIONS: dict[str, tuple[str, ...]] = {
    "StartWorkflow": ("Workflow",), "ReadRun": ("Tenant", "Run"), "CancelRun": ("Run",), "SignalRun": ("Run",),
    "ApproveStep": ("Run",), "RejectStep": ("Run",), "ListWorkflows": ("Catalog",), "ReadAudit": ("Tenant", "Run"),
    "ReadMemory": ("Tenant",), "WriteMemory": ("Tenant",), "EraseSubject": ("DataSubject",),
    "EvaluatePolicy": ("Tenant",), "ReconcileBudget": ("Tenant",), "ReadBudget": ("Tenant",),
    "ReplayDeadLetter": ("DeadLetter",),
}
DECISIONS = Counter("aios_authz_decisions_total", "Authorization decisions, by action and outcome",
                    ["action", "decision"])
RELOADS = Counter("aios_authz_policy_reloads_total", "Policy file reloads, by outcome (applied, refused)",
                  ["outcome"])


class PolicyFileError(ConfigError):
    """A Cedar policy or schema file that does not parse or validate."""


class AccessDenied(PolicyDenied):
    """The principal may not do this (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Resource:
    """What an action is about: a Cedar entity type, id and attributes (every tenant-owned one has ``tenant``)."""

    type: str
    id: str
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        return str(self.attrs.get("tenant", ""))

    def entity(self) -> dict[str, Any]:
        return {"uid": {"type": f"Aios::{self.type}", "id": self.id}, "attrs": dict(self.attrs), "parents": []}


def resource_for(action: str, *, tenant: str = "", run_id: str = "", workflow: str = "", subject: str = "",
                 topic: str = "") -> Resource:
    """The resource ``action`` is checked on, from the request's fields."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; declared: {sorted(ACTIONS)}")
    kind = ACTIONS[action][-1] if run_id and "Run" in ACTIONS[action] else ACTIONS[action][0]
    if kind == "Catalog":
        return Resource("Catalog", "workflows")
    if kind == "Workflow":
        return Resource("Workflow", f"{tenant}/{workflow}", {"tenant": tenant, "name": workflow})
    if kind == "Run":
        return Resource("Run", f"{tenant}/{run_id}", {"tenant": tenant, "workflow": workflow})
    if kind == "DataSubject":
        return Resource("DataSubject", f"{tenant}/{subject}", {"tenant": tenant})
    if kind == "DeadLetter":
        return Resource("DeadLetter", f"{tenant}/{topic}", {"tenant": tenant, "topic": topic})
    return Resource("Tenant", tenant, {"tenant": tenant})


@dataclass(frozen=True)
class Decision:
    """Allowed or not, the @id of every policy that decided it, and evaluation errors (if any)."""

    allowed: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grant:
    """A permitted call: who, and for which tenant."""

    principal: Principal
    tenant: str
    decision: Decision | None = None

    def actor_or(self, claimed: str) -> str:
        """Who acts: the authenticated principal; the request's own ``claimed`` actor only when
        nothing is authenticated (AIOS_GRPC_AUTH=none)."""
        return self.principal.id if self.principal.authenticated else claimed


def _principal_entity(p: Principal) -> dict[str, Any]:
    kind = "Service" if p.kind == "service" else "User"
    return {"uid": {"type": f"Aios::{kind}", "id": p.name},
            "attrs": {"tenants": sorted(p.tenants), "all_tenants": p.all_tenants, "roles": sorted(p.roles)},
            "parents": []}


_DECISION_CACHE_MAX = 4096


@dataclass(frozen=True)
class _Loaded:
    policies: Any  # cedarpy.PolicySet
    stamp: tuple[float, int]
    text: str
    # Decisions of this policy set: Cedar is a pure function of (policies, principal, action, resource,
    # context), so a decision made once stands until the set is replaced (a reload makes a new _Loaded).
    decisions: dict[Any, Decision] = field(default_factory=dict, compare=False)


class Authorizer:
    """Cedar policies from a file, validated against a schema, reloaded when the file changes."""

    def __init__(self, policy_file: Path, schema_file: Path, *, reload_s: float = 2.0) -> None:
        self.policy_file, self.schema_file, self.reload_s = Path(policy_file), Path(schema_file), reload_s
        try:
            self.schema = cedarpy.Schema.from_str(self.schema_file.read_text())
        except (OSError, ValueError) as exc:
            raise PolicyFileError(f"{self.schema_file}: not a valid Cedar schema: {exc}") from None
        self._loaded = self._load(self._read() if self.policy_file.exists() else None)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.last_error = ""

    def _read(self) -> str:
        """The policy file's text; a file that is not UTF-8 is a PolicyFileError, not a crash."""
        try:
            return self.policy_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyFileError(f"{self.policy_file}: refused: not UTF-8 text (offset {exc.start}); "
                                  "save the policies as UTF-8") from None

    def check(self, text: str) -> list[str]:
        """The errors of a policy text (parse, then schema validation); empty when it is good."""
        try:
            cedarpy.PolicySet.from_str(text)
        except ValueError as exc:
            return [f"does not parse: {exc}"]
        result = cedarpy.validate_policies(text, self.schema)
        ids = result.id_annotations_by_policy_id
        return [f"policy {ids.get(e.policy_id, e.policy_id) or '?'}: {e.error}" for e in result.errors]

    def _load(self, text: str | None) -> _Loaded:
        if text is None:
            raise PolicyFileError(f"{self.policy_file}: cannot read the policy file (set AIOS_AUTHZ_POLICY_FILE)")
        errors = self.check(text)
        if errors:
            raise PolicyFileError(f"{self.policy_file}: refused: " + "; ".join(errors))
        return _Loaded(policies=cedarpy.PolicySet.from_str(text), stamp=_stamp(self.policy_file), text=text)

    def reload(self) -> bool:
        """Load the file again if it changed; True when a new set is in force. A bad file keeps the old set."""
        stamp = _stamp(self.policy_file)
        if stamp == self._loaded.stamp:
            return False
        with self._lock:
            if stamp == self._loaded.stamp:
                return False
            try:
                loaded = self._load(self._read())
            except (OSError, PolicyFileError) as exc:
                # Remember the stamp so the same broken file is reported once, not on every request.
                self._loaded = _Loaded(self._loaded.policies, stamp, self._loaded.text)
                self.last_error = str(exc)
                RELOADS.labels("refused").inc()
                log.error("authorization policies NOT reloaded, the previous set stays in force: %s", exc)
                return False
            self._loaded, self.last_error = loaded, ""
            RELOADS.labels("applied").inc()
            log.info("authorization policies reloaded from %s", self.policy_file)
            return True

    def _maybe_reload(self) -> None:
        if self.reload_s and time.monotonic() - self._checked >= self.reload_s:
            self._checked = time.monotonic()
            self.reload()

    def decide(self, principal: Principal, action: str, resource: Resource,
               context: Mapping[str, Any] | None = None) -> Decision:
        """Evaluate the policies for one request."""
        self._maybe_reload()
        loaded = self._loaded
        try:
            key: Any = (principal, action, resource.type, resource.id, tuple(sorted(resource.attrs.items())),
                        tuple(sorted((context or {}).items())))
            hash(key)
        except TypeError:  # an unhashable attribute or context value: decide without the cache
            key = None
        if key is not None and (cached := loaded.decisions.get(key)) is not None:
            return cached
        decision = self._evaluate(loaded, principal, action, resource, context)
        if key is not None:
            if len(loaded.decisions) >= _DECISION_CACHE_MAX:
                loaded.decisions.clear()
            loaded.decisions[key] = decision
        return decision

    @staticmethod
    def _evaluate(loaded: _Loaded, principal: Principal, action: str, resource: Resource,
                  context: Mapping[str, Any] | None) -> Decision:
        kind = "Service" if principal.kind == "service" else "User"
        request = {"principal": {"type": f"Aios::{kind}", "id": principal.name},
                   "action": {"type": "Aios::Action", "id": action},
                   "resource": {"type": f"Aios::{resource.type}", "id": resource.id},
                   "context": dict(context or {})}
        entities = json.dumps([_principal_entity(principal), resource.entity()])
        result = cedarpy.is_authorized(request, loaded.policies, entities)
        diag = result.diagnostics
        names = tuple(diag.id_annotations_by_reason.get(r) or r for r in diag.reasons)
        return Decision(allowed=result.allowed, policies=names, errors=tuple(diag.errors))


def _stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, -1)
    return (st.st_mtime_ns / 1e9, st.st_size)


_default: Authorizer | None = None
_default_lock = threading.Lock()


def install(instance: Authorizer | None) -> None:
    """Make ``instance`` this process's authorizer (None: load from the settings on next use)."""
    global _default
    _default = instance


def authorizer() -> Authorizer:
    """This process's authorizer, loaded from AIOS_AUTHZ_POLICY_FILE / _SCHEMA_FILE on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                from services.common.settings import GrpcAuthSettings, load_settings

                s = load_settings(GrpcAuthSettings)
                _default = Authorizer(s.authz_policy_file, s.authz_schema_file, reload_s=s.authz_reload_s)
    return _default


def require(context: Any, action: str, *, tenant: str = "", run_id: str = "", workflow: str = "",
            subject: str = "", topic: str = "", gate_role: str | None = None,
            principal: Principal | None = None) -> Grant:
    """Allow the call or raise: the one helper every servicer calls before it touches data.

    ``tenant`` is the request's field: empty means the principal's own tenant; another tenant than the
    principal's is PERMISSION_DENIED. ``gate_role`` is the role an approval gate asks for (ApproveStep,
    RejectStep). Returns the grant: ``grant.tenant`` is the tenant to act for, ``grant.principal.id``
    the actor to record."""
    who = principal or current_principal() or _without_interceptor()
    if who is None:  # served without the auth interceptor while authentication is on: never a reason to allow
        raise AccessDenied(f"{action}: no authenticated principal on this call")
    if not who.authenticated:  # AIOS_GRPC_AUTH=none: no authorization, the request's tenant stands
        return Grant(principal=who, tenant=tenant)
    acting_for = who.tenant_for(tenant)
    resource = resource_for(action, tenant=acting_for, run_id=run_id, workflow=workflow, subject=subject,
                            topic=topic)
    if not acting_for and resource.type != "Catalog":
        raise InvalidArgument(f"tenant is required: {who.id} acts for several tenants "
                              f"({', '.join(sorted(who.tenants))}); name one")
    decision = authorizer().decide(who, action, resource,
                                   {"gate_role": gate_role or ""} if action in ("ApproveStep", "RejectStep") else None)
    DECISIONS.labels(action, "allow" if decision.allowed else "deny").inc()
    if not decision.allowed:
        raise AccessDenied(_denial(who, action, resource, decision, gate_role))
    return Grant(principal=who, tenant=acting_for, decision=decision)


def tenant_for(context: Any, requested: str, *, principal: Principal | None = None) -> Grant:
    """The tenant a call acts for, checked against the principal's tenants only (no action yet): for a
    handler that must load something before it knows what to ask ``require`` (a gate's role). Another
    tenant than the principal's is PERMISSION_DENIED before anything of it is read."""
    who = principal or current_principal() or _without_interceptor()
    if who is None:
        raise AccessDenied("no authenticated principal on this call")
    if not who.authenticated:
        return Grant(principal=who, tenant=requested)
    tenant = who.tenant_for(requested)
    if not tenant:
        raise InvalidArgument(f"tenant is required: {who.id} acts for several tenants "
                              f"({', '.join(sorted(who.tenants))}); name one")
    if not who.all_tenants and tenant not in who.tenants:
        DECISIONS.labels("ActForTenant", "deny").inc()
        raise AccessDenied(f"{who.id} may not act in tenant {tenant!r}: it acts for "
                           f"{', '.join(sorted(who.tenants)) or 'no tenant'}")
    return Grant(principal=who, tenant=tenant)


def _without_interceptor() -> Principal | None:
    """The principal of a servicer called directly (no interceptor ran): ANONYMOUS when this process
    runs with AIOS_GRPC_AUTH=none, where nothing is authenticated anyway; otherwise none (deny)."""
    import os

    return ANONYMOUS if os.environ.get("AIOS_GRPC_AUTH", "mtls") == "none" else None


def _denial(who: Principal, action: str, resource: Resource, decision: Decision, gate_role: str | None) -> str:
    where = f" in tenant {resource.tenant!r}" if "tenant" in resource.attrs else ""
    if "tenant-isolation" in decision.policies:
        return f"{who.id} may not {action}{where}: it acts for {', '.join(sorted(who.tenants)) or 'no tenant'}"
    if decision.policies:
        return f"{who.id} may not {action}{where}: forbidden by {', '.join(decision.policies)}"
    need = f" (the gate asks for role {gate_role!r})" if gate_role is not None else ""
    return f"{who.id} may not {action}{where}: no policy permits it for roles " \
           f"{', '.join(sorted(who.roles)) or '(none)'}{need}"


def anonymous_grant(tenant: str) -> Grant:
    """What ``require`` returns under AIOS_GRPC_AUTH=none (for callers that build grants themselves)."""
    return Grant(principal=ANONYMOUS, tenant=tenant)
