"""Golden renders: every preset's full output, committed under tests/chart/golden/.

A change to a template or a default shows up as a diff of these files in review.
After an intended change, regenerate them and review the diff:

    .venv/bin/python -m tests.chart.golden --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.chart import kube

GOLDEN = Path(__file__).resolve().parent / "golden"


def rendered(preset: str) -> str:
    """The preset's templates in path order, each under a `# Source:` line as `helm template` prints them."""
    values = kube.presets()[preset]
    parts = []
    for path, text in sorted(kube.render_raw(values).items()):
        if text.strip():
            parts.append(f"# Source: {path}\n{text.strip()}\n")
    return "---\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite tests/chart/golden/*.yaml")
    args = parser.parse_args(argv)
    if not args.write:
        parser.print_help()
        return 0
    GOLDEN.mkdir(exist_ok=True)
    for old in GOLDEN.glob("*.yaml"):
        old.unlink()
    for preset in sorted(kube.presets()):
        (GOLDEN / f"{preset}.yaml").write_text(rendered(preset))
        print(f"wrote {GOLDEN / preset}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
