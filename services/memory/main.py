"""Composition root of the memory service: settings, clients, servicer,
consumer and knowledge-base seeder. Nothing connects at import time."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import Field

from aiosmesh.v1 import memory_pb2_grpc
from services.common.errors import ConfigError
from services.common.runtime import ServiceRuntime
from services.common.settings import MeshSettings, load_settings
from services.common.uow import marker_ttl_s
from services.memory.coalesce import CoalescingEmbedder
from services.memory.grpc_api import Embed, MemoryServicer
from services.memory.handlers import memory_writes_handler
from services.memory.seeding import KnowledgeSeeder, load_knowledge_base
from services.memory.store import MemoryStore

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class MemorySettings(MeshSettings):
    """AIOS_MEMORY_* settings, plus AIOS_DEFAULT_TENANT for the seed tenant."""

    default_tenant: str = Field("demo", description="AIOS_DEFAULT_TENANT: the tenant of the demo and the seed")
    memory_metrics_port: int = Field(9103, ge=0, le=65535, description="/metrics port; 0 disables")
    memory_seed_file: str = Field("services/memory/knowledge/banking_kb.yaml",
                                  description="knowledge base seeded into collection 'kb'; empty disables")
    memory_seed_tenant: str = Field("", description="tenant whose 'kb' is seeded; empty means AIOS_DEFAULT_TENANT")
    memory_working_ttl_s: int = Field(3600, ge=1, description="TTL of working-memory entries")
    memory_episode_retention: int = Field(10000, ge=1, description="episodes kept per tenant (oldest trimmed)")
    memory_embed_timeout_s: float = Field(10.0, gt=0, description="timeout of one embedding call")
    memory_embed_requests_in_flight: int = Field(
        0, ge=0, le=64, description="> 0: embedding requests in flight per latency class, concurrent recalls "
        "queued behind them sharing the next request (services/memory/coalesce.py; the shared request is "
        "in one run's trace only); 0 sends every call alone, in its own run's trace")

    @property
    def seed_tenant(self) -> str:
        return self.memory_seed_tenant or self.default_tenant


def inference_embedder(settings: MemorySettings) -> Embed:
    """Embeddings from the inference service over HTTP (imported here so tests can inject their own)."""
    from services.common.inference_client import InferenceClient

    client = InferenceClient(base_url=settings.inference_url, timeout_s=settings.memory_embed_timeout_s,
                             interactive_url=settings.inference_interactive_url)

    def embed(texts: list[str], latency_class: str) -> list[list[float]]:
        return client.embed(texts, latency_class=latency_class)

    if not settings.memory_embed_requests_in_flight:
        return embed
    return CoalescingEmbedder(embed, max_in_flight=settings.memory_embed_requests_in_flight)


def bootstrap(settings: MemorySettings, *, embed: Embed | None = None) -> ServiceRuntime:
    """Build and start everything: gRPC server, memory_writes consumer, kb seeder."""
    items = load_knowledge_base(settings.memory_seed_file) if settings.memory_seed_file else []
    rt = ServiceRuntime("memory", settings, metrics_port=settings.memory_metrics_port)
    embed = embed or inference_embedder(settings)
    # A consumed write's marker must outlive any redelivery of it: the topic's retention.
    store = MemoryStore(rt.redis, marker_ttl_s=marker_ttl_s(rt.catalog.spec("memory_writes").retention_ms))
    rt.ensure_topics()

    def publish_audit(key: str, record: dict[str, Any]) -> None:
        rt.producer.send("audit", key=key, record=record)  # send fills event id, time and headers
        rt.producer.flush(10)  # an erasure is not done until its audit record is durable

    servicer = MemoryServicer(store, embed, publish_audit=publish_audit, embedding_model=EMBEDDING_MODEL)
    rt.serve(settings.memory_addr, [(memory_pb2_grpc.add_MemoryServiceServicer_to_server, servicer,
                                     "aiosmesh.v1.MemoryService")])
    rt.consume("memory", ["memory_writes"],
               memory_writes_handler(store, working_ttl_s=settings.memory_working_ttl_s,
                                     episode_retention=settings.memory_episode_retention),
               fetch_wait_ms=settings.background_fetch_wait_ms)
    if items:
        KnowledgeSeeder(store, embed, settings.seed_tenant, items).start()
    return rt


def main() -> None:
    settings = load_settings(MemorySettings)
    try:
        rt = bootstrap(settings)
    except ConfigError as exc:
        print(f"memory: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    rt.run_until_stopped()
