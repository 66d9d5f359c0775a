"""The router's embedding cache: text -> MiniLM vector, least recently used out first.

Why: a triaged message is embedded twice, once by the planner's classify call
(bulk tier) and again when the reply workflow recalls help articles with the
same text (memory's embed call, interactive tier). Every classify result
carries the vectors it was computed from, so the router keeps them and answers
the later embed from memory instead of running the model again. Bounded:
``max_items`` x 1.5 kB (384 float32)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class EmbeddingCache:
    """LRU of unit-norm vectors by exact text; ``max_items`` 0 disables it."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        vector = self._items.get(text)
        if vector is None:
            self.misses += 1
            return None
        self._items.move_to_end(text)
        self.hits += 1
        return vector

    def put_many(self, texts: list[str], vectors: np.ndarray) -> None:
        if not self.max_items:
            return
        for text, vector in zip(texts, vectors, strict=True):
            self._items[text] = np.array(vector, dtype=np.float32)  # a copy: never pin the whole batch
            self._items.move_to_end(text)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def snapshot(self) -> dict[str, int]:
        return {"items": len(self._items), "max_items": self.max_items, "hits": self.hits, "misses": self.misses}
