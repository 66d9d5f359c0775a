"""The money a tool moves: one declared input field and its unit per tool.

A tool that pays or refunds declares, next to its connector definition in
``services/executor/connectors.yaml``, which of its inputs is the amount and in
which unit (``amount: {field: amount, unit: cents}``). The executor sends that
field to the third party (and refuses a call where it is not a readable
amount); the policy service judges that same field, converted to currency
units, against the rules' ``amount_*`` thresholds. One declaration read by both
sides is what makes "the amount the policy sees is the amount the connector
pays" true by construction rather than by two workflow expressions that agree.

Pure: parsing and reading only; loading the file is ``load_amount_fields``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import ConfigError

__all__ = ["MAX_COST", "UNITS", "AmountField", "load_amount_fields", "parse_amount_fields", "usable_cost"]

# Currency units per declared unit: a refund of 15000 cents is 150 currency units.
UNITS: dict[str, int] = {"units": 1, "cents": 100, "micros": 1_000_000}
_NUMBER = re.compile(r"^\s*\d+(\.\d+)?\s*$")
# The largest cost a budget counts exactly (integer micro-units in Redis doubles; the policy's MAX_AMOUNT).
MAX_COST = 2**53 // 1_000_000


def usable_cost(value: Any) -> float | None:
    """A step's reported cost as a number a budget can charge, or None when it is not one (not a
    number, NaN, infinite, negative, or beyond ``MAX_COST``): policy refuses to settle such a cost."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and 0 <= number <= MAX_COST else None


@dataclass(frozen=True)
class AmountField:
    """Input ``field`` of a tool is the amount it moves, counted in ``unit``."""

    field: str
    unit: str = "units"

    def read(self, inputs: Any) -> tuple[float | None, str]:
        """The amount in currency units and ""; or (None, why) when the field is missing or is not a
        non-negative finite number (a whole number for cents and micros: no connector pays half a cent)."""
        if not isinstance(inputs, dict) or self.field not in inputs or inputs[self.field] is None:
            return None, f"input {self.field!r} ({self.unit}) is missing"
        raw = inputs[self.field]
        number = isinstance(raw, int | float) and not isinstance(raw, bool)
        value = float(raw) if number or (isinstance(raw, str) and _NUMBER.match(raw)) else None
        if value is None or not math.isfinite(value) or value < 0:
            return None, f"input {self.field!r} = {str(raw)[:40]!r} is not an amount in {self.unit}"
        if self.unit != "units" and not value.is_integer():
            return None, f"input {self.field!r} = {str(raw)[:40]!r} is not a whole number of {self.unit}"
        return value / UNITS[self.unit], ""


def _field(spec: Any, at: str) -> AmountField:
    if not isinstance(spec, dict) or set(spec) - {"field", "unit"} or not isinstance(spec.get("field"), str):
        raise ConfigError(f"{at}: expected {{field: <input name>, unit: {'|'.join(UNITS)}}}, got {spec!r}")
    unit = spec.get("unit", "units")
    if unit not in UNITS:
        raise ConfigError(f"{at}.unit: expected one of {list(UNITS)}, got {unit!r}")
    return AmountField(spec["field"], str(unit))


def parse_amount_fields(raw: Any, source: str) -> dict[str, AmountField]:
    """The amount declarations of a connectors document -> {"<tool>": AmountField}: each HTTP tool's
    ``connectors.<c>.tools.<t>.amount``, and ``amounts.<tool>`` for plug-in (Python) tools. A
    declaration naming an input an HTTP tool does not send, an unknown unit or a tool declared
    twice is a ConfigError."""
    found: dict[str, AmountField] = {}
    doc = raw if isinstance(raw, dict) else {}
    for cname, conf in (doc.get("connectors") or {}).items():
        for tname, tconf in ((conf or {}).get("tools") or {}).items():
            spec = (tconf or {}).get("amount")
            if spec is None:
                continue
            at = f"{source}: connectors.{cname}.tools.{tname}.amount"
            declared = _field(spec, at)
            sent = set(tconf.get("body") or ()) | set(re.findall(r"\{(\w+)\}", str(tconf.get("path", ""))))
            if declared.field not in sent:
                raise ConfigError(f"{at}.field: {declared.field!r} is not an input the tool sends "
                                  f"(body or path): {sorted(sent)}")
            found[f"{cname}.{tname}"] = declared
    plugins = doc.get("amounts") or {}
    if not isinstance(plugins, dict):
        raise ConfigError(f"{source}: amounts: expected a mapping of tool name -> {{field, unit}}")
    for name, spec in plugins.items():
        if name in found:
            raise ConfigError(f"{source}: amounts.{name}: declared twice (also under connectors)")
        found[str(name)] = _field(spec, f"{source}: amounts.{name}")
    return found


def load_amount_fields(path: Path) -> dict[str, AmountField]:
    """The amount declarations of a connectors file (empty if the file declares none)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the tools' amount declarations: {exc}") from None
    return parse_amount_fields(raw, str(path))
