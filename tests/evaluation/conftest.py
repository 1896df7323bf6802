"""Tiny models and small labelled sets for the evaluation tests (no download, no data layer)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from layerprune import data
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


@pytest.fixture
def fake_data_layer(monkeypatch, tmp_path):
    """Stand-ins for the data layer's contract: a byte-level token stream of a file, a labelled set."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))

    def token_stream(tokenizer, source, split="test", text_field=None):
        with open(source) as handle:
            return torch.tensor(tokenizer(handle.read(), add_special_tokens=False)["input_ids"])

    monkeypatch.setattr(data, "token_stream", token_stream, raising=False)
    monkeypatch.setattr(data, "load_labelled", lambda name, split: letters_task(10, seed=5), raising=False)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 16)  # longer than one default window
    return text
