"""Tiny models and small labelled sets for the evaluation tests (no download, no data layer)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from layerprune.models.loading import LoadedModel
from tests.helpers import tiny_loaded


@dataclass
class Labelled:
    """Same fields as the data layer's ``LabelledDataset``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


def letters_task(size: int, seed: int) -> Labelled:
    """A learnable two-class task: words from the first or the second half of the alphabet."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(size):
        label = rng.randrange(2)
        alphabet = "abcdefghijklm" if label == 0 else "nopqrstuvwxyz"
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(5, 15))))
        labels.append(label)
    return Labelled(texts, labels, ["low", "high"])


@pytest.fixture
def loaded() -> LoadedModel:
    return tiny_loaded(num_layers=4)
