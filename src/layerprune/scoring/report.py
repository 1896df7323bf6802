"""``score()``: run the requested metrics on a model and collect them in a :class:`ScoreReport`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.scoring.base import METRICS, MetricResult, ScoringContext
from layerprune.data.rows import CalibrationLike, CalibrationSet
from layerprune.scoring.forward import check_positions

if TYPE_CHECKING:
    from layerprune.selection import Selection


@dataclass
class ScoreReport:
    """Scores of every requested metric for the model as scored, plus what they were computed on.

    It remembers the model, the data and the options, so that the iterative strategy of
    :func:`layerprune.select` can re-score the model with fewer layers the same way.
    """

    model: str
    num_layers: int
    tokens: int
    layer_ids: list[int]
    data: dict[str, Any]
    results: dict[str, MetricResult]
    context: ScoringContext = field(repr=False)
    selection: Selection | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``scores.json`` document (see the issue's output shape; extra keys are additive)."""
        document: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "metrics": {name: result.values_json() for name, result in self.results.items()},
            "importance": {name: result.importance for name, result in self.results.items()},
            "meaning": {name: result.meaning for name, result in self.results.items()},
            "convention": "importance: one value per layer, higher = more important; selection removes the lowest",
            "original_layer_ids": self.layer_ids,
            "data": self.data,
        }
        details = {name: result.details for name, result in self.results.items() if result.details}
        if details:
            document["details"] = details
        if self.selection is not None:
            document["selection"] = self.selection.to_json()
        return document


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names (``"bi,ppl"`` or a list) before any work; returns them deduplicated."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else [m.strip() for m in metrics]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UsageError(f"no metric given; choose from: {', '.join(METRICS.names())}")
    for name in names:
        METRICS.get(name)
    return names


def needs_data(metrics: Sequence[str]) -> bool:
    return any(METRICS.get(name).needs_data for name in metrics)


def check_score_options(metrics: Sequence[str] | str, batch_size: int, positions: str) -> list[str]:
    """Refuse bad scoring options without a model (a recipe checks them before its first stage);
    returns the metric names deduplicated."""
    names = check_metrics(metrics)
    check_positions(positions)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    return names


def score(
    loaded: LoadedModel,
    calibration: CalibrationLike | torch.Tensor | None = None,
    metrics: Sequence[str] | str = ("bi",),
    *,
    batch_size: int = 8,
    positions: str = "all",
    seed: int = 0,
    data: dict[str, Any] | None = None,
) -> ScoreReport:
    """Score every decoder layer of ``loaded`` with each of ``metrics``.

    ``calibration`` is a :class:`~layerprune.data.CalibrationSet`, anything with ``input_ids`` and
    ``attention_mask``, or a bare ``input_ids`` tensor; metrics that need no data (``magnitude-*``,
    ``reverse-order``, ``random``) accept ``None``. ``positions`` is ``all`` (every real token) or
    ``last`` (the last real token of each row) for the similarity metrics. ``data`` describes the
    calibration set for the report. The model is not modified.
    """
    names = check_score_options(metrics, batch_size, positions)
    if calibration is None and needs_data(names):
        wanting = [n for n in names if METRICS.get(n).needs_data]
        raise UsageError(f"metrics {', '.join(wanting)} need calibration data; pass --data (e.g. --data wiki-sample)")
    rows = CalibrationSet.of(calibration) if calibration is not None else None
    context = ScoringContext(loaded, rows, batch_size=batch_size, positions=positions, seed=seed)
    results = {name: METRICS.get(name).compute(context, name) for name in names}
    described = dict(data or {})
    if rows is not None:
        described.setdefault("source", rows.description)
        described.update(rows=int(rows.input_ids.shape[0]), seq_len=int(rows.input_ids.shape[1]))
    described.update(positions=positions, batch_size=batch_size, seed=seed)
    return ScoreReport(
        model=loaded.source, num_layers=loaded.num_layers, tokens=rows.tokens if rows is not None else 0,
        layer_ids=loaded.original_layer_ids, data=described, results=results, context=context,
    )
