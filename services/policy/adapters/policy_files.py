"""Reads ``policies/*.yaml`` into one PolicySet, once at start-up."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.common.errors import ConfigError
from services.policy.domain.model import PolicySet
from services.policy.domain.parse import combine, parse_policy_file


def load_policy_dir(directory: Path) -> PolicySet:
    """Parse every ``*.yaml``/``*.yml`` file in name order; ConfigError names the file and path."""
    if not directory.is_dir():
        raise ConfigError(f"policy directory {directory} does not exist (set AIOS_POLICY_DIR)")
    paths = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    files = []
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        files.append(parse_policy_file(data, str(path)))
    if not files:
        raise ConfigError(f"no policy files in {directory}: add at least one *.yaml (see policies/default.yaml)")
    return combine(files)
