"""The memory service's own metrics. Labels stay bounded (no tenant, no
collection: both are caller-chosen); per-tenant views come from the audit."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECALL_SECONDS = Histogram(
    "aios_memory_recall_duration_seconds", "Recall latency, split into embedding the query and the vector search",
    ["phase"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ITEMS_STORED = Counter("aios_memory_items_stored_total", "Semantic items written to vector sets", ["source"])
EPISODES_RECORDED = Counter("aios_memory_episodes_recorded_total", "Episodes appended (duplicates excluded)",
                            ["outcome"])
WRITES_DUPLICATE = Counter("aios_memory_writes_duplicate_total",
                           "Memory writes skipped because their event id was already applied", ["kind"])
ERASURES = Counter("aios_memory_erasures_total", "Forget(subject) calls that erased something")
ERASED_ENTRIES = Counter("aios_memory_erased_entries_total", "Entries erased by Forget", ["kind"])
FACT_CONFLICTS = Counter("aios_memory_fact_conflicts_total", "PutFact calls refused for a stale version")
