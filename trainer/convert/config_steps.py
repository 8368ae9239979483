"""The matrix's config ``prepare`` steps on a checkpoint's config.json: drop a key, set keys (atomic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.convert import ConvertError
from trainer.models.weight_files import read_json


def _write(path: Path, config: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)


def drop_config_key(directory: Path, key: str) -> bool:
    """Remove ``key`` from config.json; False when it was not there (the step is idempotent)."""
    path = directory / "config.json"
    config = read_json(path)
    if key not in config:
        return False
    del config[key]
    _write(path, config)
    return True


def set_config(directory: Path, assignments: list[str]) -> dict:
    """Set ``key=value`` pairs in config.json; values are JSON (``0``, ``null``, ``{"a": "b"}``) or strings."""
    path = directory / "config.json"
    config = read_json(path)
    updates = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConvertError(f"set-config: {item!r} is not key=value")
        try:
            updates[key] = json.loads(raw)
        except json.JSONDecodeError:
            updates[key] = raw
    config.update(updates)
    _write(path, config)
    return updates
