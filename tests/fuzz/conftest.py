"""Fuzzing with hypothesis: every target counts the examples it ran, and the session's summary
prints them (the README's "Fuzzing" figures come from that line). A crash is any exception the
target does not document, a hang an example over its hypothesis deadline.

Examples per target are the ``FUZZ_EXAMPLES`` share of each test's ``max_examples`` (1.0 in
``make test``; ``AIOS_FUZZ_SCALE=10`` for a longer hunt)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

EXAMPLES: Counter[str] = Counter()
SCALE = float(os.environ.get("AIOS_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """``n`` examples, scaled by AIOS_FUZZ_SCALE."""
    return max(1, int(n * SCALE))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if EXAMPLES:
        parts = ", ".join(f"{target} {count}" for target, count in sorted(EXAMPLES.items()))
        terminalreporter.write_line(f"fuzz examples run: {parts} (total {sum(EXAMPLES.values())})")
