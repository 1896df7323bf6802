"""The two containers of token rows: rows a model is run on, and rows it is trained on.

Why two and not one: a :class:`CalibrationSet` has no labels at all. Scoring and perplexity
derive their targets (the next real token) from the attention mask, and the set carries the
provenance needed to rebuild it exactly. A :class:`TrainingSet` always carries explicit labels,
because what to predict is not implied by the tokens: instruction data masks the prompt, and a
classifier predicts one class per row. Everything else (shapes, dtype, the ``[rows, seq_len]``
layout) is the same, and both are built only here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from layerprune.errors import UsageError
from layerprune.progress import progress


class CalibrationLike(Protocol):
    """Anything with ``input_ids`` and ``attention_mask`` ``[rows, seq_len]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class CalibrationSet:
    """Rows of token ids ``[samples, seq_len]`` with their attention mask and provenance."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data: CalibrationLike | torch.Tensor) -> CalibrationSet:
        """Accept a CalibrationSet, anything shaped like one, or a bare ``input_ids`` tensor, checked
        once before any model work (a metric should not fail an hour in on a malformed set)."""
        if isinstance(data, torch.Tensor):
            ids, mask = data, torch.ones_like(data)
        else:
            ids, mask = data.input_ids, data.attention_mask
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise UsageError(f"calibration input_ids and attention_mask must both be [rows, seq_len], got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if int(mask.sum()) == 0:
            raise UsageError("the calibration data holds no real tokens (attention_mask is all 0); use other data")
        if isinstance(data, CalibrationSet):
            info = data.info
        else:
            info = {"source": str(getattr(data, "description", None) or getattr(data, "source", None) or "tensors")}
        return cls(ids.long(), mask.long(), info)

    @property
    def description(self) -> str:
        """A short label for reports and logs, e.g. ``wiki-sample (train split)``."""
        source = self.info.get("source", "tensors")
        return f"{source} ({self.info['split']} split)" if "split" in self.info else str(source)

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens: what a metric or a loss actually saw."""
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int, label: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive row slices as model keyword arguments (``model(**batch)``); the last may be
        short. With ``label``, their progress is shown under that name (:mod:`layerprune.progress`)."""
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        starts = range(0, self.input_ids.shape[0], batch_size)
        for start in progress(starts, label or "", unit="batches", shown=label is not None):
            yield {"input_ids": self.input_ids[start:start + batch_size],
                   "attention_mask": self.attention_mask[start:start + batch_size]}

    def describe(self) -> dict[str, Any]:
        """Provenance for reports and model cards: enough to rebuild exactly these rows."""
        return {**self.info, "tokens": self.tokens}


@dataclass(frozen=True)
class TrainingSet:
    """Equal-length training rows: tokens, which tokens are real, and what to predict.

    ``labels`` are per-token targets ``[rows, seq_len]`` (``-100`` where nothing is predicted: a
    prompt, padding) for language modelling, or one class per row ``[rows]`` for classification
    (read at the last position of left-padded prompts).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    description: str = "tensors"

    def __post_init__(self) -> None:
        rows_and_length = tuple(self.input_ids.shape)
        labels = tuple(self.labels.shape)
        if (self.input_ids.dim() != 2 or tuple(self.attention_mask.shape) != rows_and_length
                or labels not in (rows_and_length, rows_and_length[:1])):
            shapes = sorted({tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.labels)})
            raise UsageError(f"training tensors must all have the same [rows, seq_len] shape (labels may instead "
                             f"be one class per row), got {shapes}")

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, description: str = "tensors") -> TrainingSet:
        """Every token is real and every token is a target (language modelling on windows)."""
        return cls(input_ids, torch.ones_like(input_ids), input_ids.clone(), description)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}

    def digest(self) -> str:
        """A content hash, so cached teacher pairs are reused only for the very same data."""
        hasher = hashlib.sha256()
        for tensor in (self.input_ids, self.attention_mask, self.labels):
            hasher.update(tensor.contiguous().numpy().tobytes())
        return hasher.hexdigest()[:16]
