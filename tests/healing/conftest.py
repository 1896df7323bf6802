"""Tiny pruned models and training rows shared by the healing tests."""

from __future__ import annotations

import pytest
import torch

import layerprune as lp
from layerprune.healing import TrainingSet
from layerprune.models.loading import LoadedModel
from tests.helpers import tiny_loaded

NUM_LAYERS = 6
BLOCK = (2, 4)


def pruned_pair(family: str = "llama") -> tuple[LoadedModel, LoadedModel]:
    """(original, the same model with BLOCK removed), as two independent objects."""
    pruned = tiny_loaded(family, NUM_LAYERS)
    lp.prune(pruned, range(*BLOCK))
    return tiny_loaded(family, NUM_LAYERS), pruned


def training_rows(rows: int = 32, seq_len: int = 16, seed: int = 0) -> TrainingSet:
    generator = torch.Generator().manual_seed(seed)
    return TrainingSet.from_ids(torch.randint(0, 256, (rows, seq_len), generator=generator))


@pytest.fixture
def pair_cache(tmp_path, monkeypatch) -> None:
    """Replacement pairs are cached on disk; keep a test's pairs to itself and out of the user's
    cache (only the pairs: the real models stay in the shared cache)."""
    from layerprune.healing import replacement

    monkeypatch.setattr(replacement, "cache_dir", lambda: tmp_path / "cache")
