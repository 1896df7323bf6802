"""The two row containers: what they accept, what they refuse, and what they say they hold."""

from __future__ import annotations

import pytest
import torch

from layerprune.data import CalibrationSet, TrainingSet
from layerprune.errors import UsageError

IDS = torch.arange(12).reshape(3, 4)


def test_calibration_of_a_tensor_a_set_or_a_lookalike() -> None:
    bare = CalibrationSet.of(IDS.int())
    assert bare.input_ids.dtype == torch.long and torch.equal(bare.input_ids, IDS)
    assert torch.equal(bare.attention_mask, torch.ones_like(IDS)) and bare.description == "tensors"
    built = CalibrationSet(IDS, torch.ones_like(IDS), {"source": "wiki-sample", "split": "train", "seed": 3})
    assert CalibrationSet.of(built).description == "wiki-sample (train split)"
    assert CalibrationSet.of(built).info == built.info
    training = TrainingSet.from_ids(IDS, "notes.txt (train split)")
    assert CalibrationSet.of(training).description == "notes.txt (train split)"


def test_calibration_refuses_malformed_rows() -> None:
    with pytest.raises(UsageError, match=r"\[rows, seq_len\]"):
        CalibrationSet.of(IDS[0])
    with pytest.raises(UsageError, match="no real tokens"):
        CalibrationSet.of(CalibrationSet(IDS, torch.zeros_like(IDS)))


def test_batches_can_show_progress_and_cover_the_rows() -> None:
    rows = CalibrationSet(IDS, torch.ones_like(IDS))
    batches = list(rows.batches(2, "a label"))
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), IDS)
    with pytest.raises(UsageError, match="batch size"):
        next(rows.batches(0))


def test_training_labels_are_per_token_or_one_class_per_row() -> None:
    mask = torch.ones_like(IDS)
    assert len(TrainingSet(IDS, mask, IDS.clone())) == 3
    classes = TrainingSet(IDS, mask, torch.tensor([0, 1, 0]))
    assert torch.equal(classes.take([2, 1])["labels"], torch.tensor([0, 1]))
    for labels in (torch.zeros(2, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)):
        with pytest.raises(UsageError, match="same"):
            TrainingSet(IDS, mask, labels)
