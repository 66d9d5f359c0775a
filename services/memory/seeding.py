"""Seeding the knowledge base into the ``kb`` collection at start-up.

The inference service may come up after us (its model pools take seconds), so
seeding runs on a background thread and retries with capped backoff; the gRPC
server serves meanwhile, and a Recall on the still-empty collection returns
what exists (nothing). Seeding only writes into an empty collection and the
articles have fixed ids, so a second seeder (another replica) at worst
rewrites the same items."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import yaml

from services.common.catalog import REPO_ROOT
from services.common.errors import ConfigError, InvalidArgument
from services.memory import domain, metrics
from services.memory.domain import Item
from services.memory.grpc_api import Embed, embed_checked
from services.memory.store import MemoryStore

log = logging.getLogger(__name__)


def load_knowledge_base(path_setting: str) -> list[Item]:
    """The articles of the seed file as items; a bad file stops the process (ConfigError)."""
    path = Path(path_setting)
    if not path.is_absolute():
        path = REPO_ROOT / path
    try:
        return domain.kb_items(yaml.safe_load(path.read_text()), source=path.name)
    except (OSError, yaml.YAMLError, ValueError, InvalidArgument) as exc:  # InvalidArgument: a bad article id
        raise ConfigError(f"AIOS_MEMORY_SEED_FILE={path_setting}: {exc}; fix the file or set the "
                          "variable to an empty string to disable seeding") from exc


def seed_knowledge_base(store: MemoryStore, embed: Embed, tenant: str, items: list[Item]) -> int:
    """Write ``items`` into the tenant's kb collection if it is empty; return how many were written."""
    if store.collection_size(tenant, domain.KB_COLLECTION) > 0:
        return 0
    # One batched call in the high-throughput tier: seeding is not latency-critical.
    vectors = embed_checked(embed, [i.embed_text for i in items], "bulk")
    stored = store.remember(tenant, domain.KB_COLLECTION, items, vectors)
    metrics.ITEMS_STORED.labels("seed").inc(stored)
    return stored


class KnowledgeSeeder:
    """Background seeding with capped exponential backoff until it succeeds or is stopped."""

    def __init__(self, store: MemoryStore, embed: Embed, tenant: str, items: list[Item], *,
                 first_delay_s: float = 0.5, max_delay_s: float = 30.0) -> None:
        self.store, self.embed, self.tenant, self.items = store, embed, tenant, items
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-kb-seeder", daemon=True)

    def start(self) -> KnowledgeSeeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        delay = self.first_delay_s
        while not self._stop.is_set():
            try:
                stored = seed_knowledge_base(self.store, self.embed, self.tenant, self.items)
                log.info("knowledge base %s", f"seeded with {stored} articles" if stored else "already seeded",
                         extra={"fields": {"tenant": self.tenant, "collection": domain.KB_COLLECTION}})
                self.done.set()
                return
            except Exception as exc:  # inference or Redis not up yet: both come and go independently
                log.warning("knowledge base seeding failed (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
            self._stop.wait(delay * random.uniform(0.8, 1.0))
            delay = min(self.max_delay_s, delay * 2)
