"""gRPC edge of the memory service: validates requests with the domain rules,
embeds through the injected embedder, calls the store and converts rows to
protobuf messages. Errors are mesh errors; the shared interceptor maps them
to status codes (InvalidArgument, NotFound, Conflict -> ABORTED, transient ->
UNAVAILABLE). Every method is authorized first (services.common.authz): the
tenant is the caller's, reading needs ReadMemory, writing WriteMemory, and
Forget EraseSubject (a privacy officer)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from aiosmesh.v1 import memory_pb2, memory_pb2_grpc
from services.common import authz
from services.common.audit import audit_record
from services.common.errors import AiosError, Conflict, InvalidArgument, NotFound, TransientError
from services.memory import domain, metrics
from services.memory.store import MemoryStore

Embed = Callable[[list[str], str], Sequence[Sequence[float]]]
AuditSink = Callable[[str, dict[str, Any]], None]

# Remember of a handful of items is usually on a run's critical path; big
# batches (imports, seeding) belong in the high-throughput tier.
_INTERACTIVE_REMEMBER_MAX = 8


def embed_checked(embed: Embed, texts: list[str], latency_class: str) -> list[list[float]]:
    """Embed ``texts``; an embedder failure we cannot classify is treated as transient."""
    try:
        vectors = embed(texts, latency_class)
    except AiosError:
        raise
    except Exception as exc:
        raise TransientError(f"embedding failed ({type(exc).__name__}: {exc}); retry shortly") from exc
    domain.check_vectors(vectors, len(texts))
    return [list(v) for v in vectors]


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """MemoryService: Remember/Recall, GetFact/PutFact, ListEpisodes, Forget."""

    def __init__(self, store: MemoryStore, embed: Embed, *, publish_audit: AuditSink,
                 embedding_model: str = "all-MiniLM-L6-v2") -> None:
        self.store = store
        self.embed = embed
        self.publish_audit = publish_audit
        self.embedding_model = embedding_model

    def Remember(self, request: memory_pb2.RememberRequest,
                 context: grpc.ServicerContext) -> memory_pb2.RememberResponse:
        tenant = domain.require_name(authz.require(context, "WriteMemory", tenant=request.tenant).tenant, "tenant")
        collection = domain.require_name(request.collection, "collection")
        domain.require_item_count(len(request.items))
        items = []
        for it in request.items:
            if it.collection and it.collection != collection:
                raise InvalidArgument(f"item {it.id or '(new)'} names collection {it.collection!r} but the "
                                      f"request is for {collection!r}: leave item.collection empty or equal")
            items.append(domain.prepare_item(it.id, it.text, it.metadata_json, it.subject, it.provenance_json))
        domain.require_unique_ids(items)
        latency_class = "interactive" if len(items) <= _INTERACTIVE_REMEMBER_MAX else "bulk"
        vectors = embed_checked(self.embed, [i.embed_text for i in items], latency_class)
        stored = self.store.remember(tenant, collection, items, vectors)
        metrics.ITEMS_STORED.labels("grpc").inc(stored)
        return memory_pb2.RememberResponse(stored=stored)

    def Recall(self, request: memory_pb2.RecallRequest, context: grpc.ServicerContext) -> memory_pb2.RecallResponse:
        tenant = domain.require_name(authz.require(context, "ReadMemory", tenant=request.tenant).tenant, "tenant")
        collection = domain.require_name(request.collection, "collection")
        query = domain.require_query(request.query)
        k = domain.require_k(request.k)
        latency_class = domain.latency_class_or_default(request.latency_class)
        started = time.perf_counter()
        try:
            vector = _embed_within_deadline(self.embed, query, latency_class, context)
        except TransientError:
            # Inference down but nothing to search (e.g. kb not seeded yet): the
            # honest answer is "no items", not UNAVAILABLE. Checked only on
            # failure, so the normal path pays no extra round trip.
            if self.store.collection_size(tenant, collection) == 0:
                return memory_pb2.RecallResponse(embedding_model=self.embedding_model)
            raise
        embedded = time.perf_counter()
        hits = self.store.recall(tenant, collection, vector, k)
        metrics.RECALL_SECONDS.labels("embed").observe(embedded - started)
        metrics.RECALL_SECONDS.labels("search").observe(time.perf_counter() - embedded)
        return memory_pb2.RecallResponse(items=[_item(h) for h in hits], embedding_model=self.embedding_model)

    def GetFact(self, request: memory_pb2.GetFactRequest, context: grpc.ServicerContext) -> memory_pb2.Fact:
        tenant = domain.require_name(authz.require(context, "ReadMemory", tenant=request.tenant).tenant, "tenant")
        key = domain.require_fact_key(request.key)
        body = self.store.get_fact(tenant, key)
        if body is None:
            raise NotFound(f"no fact {key!r} for tenant {tenant!r}: PutFact with expected_version=0 creates it")
        return _fact(tenant, key, body)

    def PutFact(self, request: memory_pb2.PutFactRequest, context: grpc.ServicerContext) -> memory_pb2.Fact:
        tenant = domain.require_name(authz.require(context, "WriteMemory", tenant=request.tenant).tenant, "tenant")
        key = domain.require_fact_key(request.key)
        expected = domain.require_expected_version(request.expected_version)
        if not request.value_json:
            raise InvalidArgument("value_json is required: send the fact's value as JSON, e.g. {\"city\": \"Oslo\"}")
        value = domain.parse_json_field("value_json", request.value_json, want_object=False)
        provenance = domain.parse_json_field("provenance_json", request.provenance_json)
        subject = domain.require_subject(request.subject) if request.subject else ""
        value_json, provenance_json = domain.canonical_json(value), domain.canonical_json(provenance)
        try:
            version = self.store.put_fact(tenant, key, value_json, expected_version=expected,
                                          provenance_json=provenance_json, subject=subject)
        except Conflict:
            metrics.FACT_CONFLICTS.inc()
            raise
        return memory_pb2.Fact(tenant=tenant, key=key, value_json=value_json, version=version or 0,
                               provenance_json=provenance_json, subject=subject)

    def ListEpisodes(self, request: memory_pb2.ListEpisodesRequest,
                     context: grpc.ServicerContext) -> memory_pb2.ListEpisodesResponse:
        tenant = domain.require_name(authz.require(context, "ReadMemory", tenant=request.tenant).tenant, "tenant")
        limit = domain.episode_limit_or_default(request.limit)
        rows = self.store.list_episodes(tenant, request.workflow, limit)
        return memory_pb2.ListEpisodesResponse(episodes=[
            memory_pb2.Episode(run_id=r.get("run_id", ""), workflow=r.get("workflow", ""),
                               outcome=r.get("outcome", ""), content_json=r.get("content_json", ""),
                               recorded_at_ms=float(r.get("recorded_at_ms") or 0)) for r in rows])

    def Forget(self, request: memory_pb2.ForgetRequest, context: grpc.ServicerContext) -> memory_pb2.ForgetResponse:
        subject = domain.require_subject(request.subject)
        grant = authz.require(context, "EraseSubject", tenant=request.tenant, subject=subject)
        tenant = domain.require_name(grant.tenant, "tenant")
        result = self.store.forget(tenant, subject)
        if result.erased:
            metrics.ERASURES.inc()
        for kind, n in result.by_kind.items():
            metrics.ERASED_ENTRIES.labels(kind).inc(n)
        # Audited even when nothing was found: the request itself is what an auditor asks about.
        self.publish_audit(subject, audit_record(
            "memory", tenant, "memory.forget", decision="erased" if result.erased else "nothing_to_erase",
            actor=grant.principal.id if grant.principal.authenticated else None,
            reason="data subject erasure request",
            detail={"subject": subject, "erased": result.erased, "by_kind": result.by_kind}))
        return memory_pb2.ForgetResponse(erased=result.erased)


def _item(hit: dict[str, Any]) -> memory_pb2.MemoryItem:
    return memory_pb2.MemoryItem(id=hit["id"], collection=hit["collection"], text=hit.get("text", ""),
                                 metadata_json=hit.get("metadata_json", ""), subject=hit.get("subject", ""),
                                 provenance_json=hit.get("provenance_json", ""), score=hit["score"])


def _fact(tenant: str, key: str, body: dict[str, str]) -> memory_pb2.Fact:
    return memory_pb2.Fact(tenant=tenant, key=key, value_json=body.get("value_json", ""),
                           version=int(body.get("version", 0)), provenance_json=body.get("provenance_json", ""),
                           subject=body.get("subject", ""))


def _embed_within_deadline(embed: Any, query: str, latency_class: str, context: grpc.ServicerContext) -> Any:
    """Embed the query, retrying a transient inference failure (a restart) with capped backoff while the
    caller's deadline leaves room: a dependency coming back must not fail the recall step."""
    delay = 0.1
    while True:
        try:
            return embed_checked(embed, [query], latency_class)[0]
        except TransientError:
            remaining = context.time_remaining() if context is not None else None
            if remaining is None or remaining < delay + 0.5:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
