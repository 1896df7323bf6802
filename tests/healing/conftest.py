"""Tiny pruned models and training rows shared by the healing tests."""

from __future__ import annotations

import pytest
import torch

import layerprune as lp
from layerprune.healing import TrainingSet
from layerprune.models.architectures import adapter_for
from layerprune.models.loading import LoadedModel
from layerprune.models.tiny import byte_tokenizer, tiny_model

NUM_LAYERS = 6
BLOCK = (2, 4)


def tiny_loaded(family: str = "llama", seed: int = 0) -> LoadedModel:
    model = tiny_model(family, NUM_LAYERS, seed=seed)
    return LoadedModel(model, byte_tokenizer(), f"tiny-{family}", adapter_for(model))


def pruned_pair(family: str = "llama") -> tuple[LoadedModel, LoadedModel]:
    """(original, the same model with BLOCK removed), as two independent objects."""
    pruned = tiny_loaded(family)
    lp.prune(pruned, range(*BLOCK))
    return tiny_loaded(family), pruned


def training_rows(rows: int = 32, seq_len: int = 16, seed: int = 0) -> TrainingSet:
    generator = torch.Generator().manual_seed(seed)
    return TrainingSet.from_ids(torch.randint(0, 256, (rows, seq_len), generator=generator))


@pytest.fixture
def pair_cache(tmp_path, monkeypatch) -> None:
    """Replacement pairs are cached on disk; keep a test's pairs to itself and out of the user's
    cache (only the pairs: the real models stay in the shared cache)."""
    from layerprune.healing import replacement

    monkeypatch.setattr(replacement, "cache_dir", lambda: tmp_path / "cache")
