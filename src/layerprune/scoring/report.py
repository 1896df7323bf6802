"""``score()``: run the requested metrics on a model and collect them in a :class:`ScoreReport`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from layerprune.data.rows import CalibrationLike, CalibrationSet
from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import (
    ATTENTION, MLP, branch_parameters, branch_units, check_sublayers, parse_unit, remove_branches, unit_name,
)
from layerprune.models.surgery import remove_layers
from layerprune.scoring.base import METRICS, MetricResult, ScoringContext, metric_options
from layerprune.scoring.config import DEFAULT_SCORE, ScoreConfig, check_metrics


class Documented(Protocol):
    """Anything that writes itself as a JSON document (a :class:`layerprune.Selection`)."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ScoreReport:
    """Scores of every requested metric for the model as scored, plus a description of the data.

    Plain data: it holds neither the model nor a selection, so selecting from it never changes
    it and it can be rebuilt from its JSON. Re-scoring a smaller model (the iterative strategy)
    goes through :func:`rescorer`.
    """

    model: str
    num_layers: int
    tokens: int
    layer_ids: list[int]
    data: dict[str, Any]
    results: dict[str, MetricResult]
    config: ScoreConfig
    """What was asked for (the metrics, the batch); the metrics' own options are in ``data``."""
    unit_parameters: dict[str, int] | None = None
    """At sub-layer granularity, each branch's parameters (what a budget of decoder parameters counts)."""

    @property
    def units(self) -> list[str] | None:
        """The branches the values belong to at sub-layer granularity (None: one value per layer)."""
        return next(iter(self.results.values())).units if self.results else None

    def labels(self) -> list[str]:
        """What each value scores: the layer's index, or the branch's unit name."""
        return self.units or [str(index) for index in range(self.num_layers)]

    def to_json(self, selection: Documented | None = None) -> dict[str, Any]:
        """The ``scores.json`` document (see the issue's output shape; extra keys are additive),
        with ``selection`` (what :func:`layerprune.select` chose from these scores) when given."""
        document: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "metrics": {name: result.values_json() for name, result in self.results.items()},
            "importance": {name: result.importance for name, result in self.results.items()},
            "meaning": {name: result.meaning for name, result in self.results.items()},
            "convention": f"importance: one value per {'branch (units)' if self.units else 'layer'}, higher = more "
                          "important; selection removes the lowest",
            "original_layer_ids": self.layer_ids,
            "data": self.data,
            "config": self.config.record(),
        }
        if self.units:
            document.update(units=self.units, unit_parameters=self.unit_parameters)
        details = {name: result.details for name, result in self.results.items() if result.details}
        if details:
            document["details"] = details
        if selection is not None:
            document["selection"] = selection.to_json()
        return document


def needs_data(metrics: Sequence[str]) -> bool:
    return any(METRICS.get(name).needs_data for name in metrics)


def check_score_options(metrics: Sequence[str] | str, batch_size: int,
                        granularity: str = DEFAULT_SCORE.granularity, **options: Any) -> ScoreConfig:
    """Refuse bad scoring options without a model (a recipe checks them before its first stage):
    the metric names, the batch and the granularity as a :class:`ScoreConfig`, and each metric option
    against its declaration; returns the config (its metrics deduplicated)."""
    config = ScoreConfig(metrics=tuple(check_metrics(metrics)), batch_size=batch_size, granularity=granularity)
    metric_options(list(config.metrics), options)
    return config


def describe_data(data: dict[str, Any] | None, rows: CalibrationSet | None, batch_size: int, options: dict[str, Any],
                  **extra: Any) -> dict[str, Any]:
    """The report's ``data``: the calibration the rows record (their :class:`CalibrationConfig`, so a score
    from the command line, a recipe or Python records the same keys), what the caller adds, the rows'
    shape and the scoring options used."""
    recorded = {key: value for key, value in rows.info.items() if key != "prefix"} if rows is not None else {}
    described = {**recorded, **(data or {})}
    if rows is not None:
        described.setdefault("source", rows.description)
        described.update(rows=int(rows.input_ids.shape[0]), seq_len=int(rows.input_ids.shape[1]))
    described.update(**options, batch_size=batch_size, **extra)
    return described


def score(
    loaded: LoadedModel,
    calibration: CalibrationLike | torch.Tensor | None = None,
    metrics: Sequence[str] | str = DEFAULT_SCORE.metrics,
    *,
    batch_size: int = DEFAULT_SCORE.batch_size,
    granularity: str = DEFAULT_SCORE.granularity,
    data: dict[str, Any] | None = None,
    **options: Any,
) -> ScoreReport:
    """Score every decoder layer of ``loaded`` (with ``granularity="sublayer"``: every attention and MLP
    branch, units ``attn.N``/``mlp.N``) with each of ``metrics``.

    ``calibration`` is a :class:`~layerprune.data.CalibrationSet`, anything with ``input_ids`` and
    ``attention_mask``, or a bare ``input_ids`` tensor; metrics that need no data (``magnitude-*``,
    ``reverse-order``, ``random``) accept ``None``. ``options`` are the metrics' own options (each
    metric's ``options_class``; docs/api.md lists them), e.g. ``positions="last"`` for the
    similarity metrics or ``seed`` for ``random``; an option no metric declares is refused.
    ``data`` describes the calibration set for the report. ``metrics`` and ``batch_size`` are a
    :class:`ScoreConfig`'s (``score(loaded, rows, **dict(config))``), which the report records. The
    model is not modified.
    """
    config = check_score_options(metrics, batch_size, granularity, **options)
    names = list(config.metrics)
    if calibration is None and needs_data(names):
        wanting = [n for n in names if METRICS.get(n).needs_data]
        raise UsageError(f"metrics {', '.join(wanting)} need calibration data; pass calibration rows (e.g. "
                         "build_calibration's; on the command line --data)")
    rows = CalibrationSet.of(calibration) if calibration is not None else None
    context = ScoringContext(loaded, rows, batch_size=batch_size, options=metric_options(names, options))
    sublayers = config.granularity == "sublayer"
    if sublayers:
        check_sublayers(loaded.adapter)
    results = {name: (METRICS.get(name).compute_branches if sublayers else METRICS.get(name).compute)(context, name)
               for name in names}
    return ScoreReport(
        model=loaded.source, num_layers=loaded.num_layers, tokens=rows.tokens if rows is not None else 0,
        layer_ids=loaded.original_layer_ids, data=describe_data(data, rows, batch_size, context.options),
        results=results, config=config, unit_parameters=unit_parameters(loaded) if sublayers else None,
    )


def unit_parameters(loaded: LoadedModel) -> dict[str, int]:
    """Each branch's parameters, by unit name (:func:`~layerprune.models.sublayers.branch_parameters`)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    return {unit_name(kind, index): branch_parameters(layers[index], loaded.adapter, kind)
            for kind, index in branch_units(loaded.model, loaded.adapter)}


def rescorer(loaded: LoadedModel, calibration: CalibrationLike | torch.Tensor | None,
             **options: Any) -> Callable[[str, list[int]], MetricResult]:
    """The ``rescore`` function of :func:`layerprune.select`'s iterative strategy: ``rescore(metric,
    removed)`` scores ``loaded`` without the layers ``removed`` (its indices) on ``calibration``
    with :func:`score`'s ``options``. Each call cuts a weight-sharing copy, so ``loaded`` stays whole.

    Several iterative selections may share one rescorer (a search runs one per metric): each
    smaller model is scored once per metric, and a metric with a ``shared_pass`` is scored with
    every metric of that pass, so iterative ``bi`` and ``angular`` walking the same layers pay
    one pass per step between them.
    """
    results: dict[tuple[str, tuple[Any, ...]], MetricResult] = {}

    def rescore(metric: str, removed: list[Any]) -> MetricResult:
        key = (metric, tuple(sorted(removed)))
        if key not in results:
            shared = METRICS.get(metric).shared_pass
            together = [metric] if shared is None else [n for n in METRICS.names()
                                                         if METRICS.get(n).shared_pass == shared]
            working = loaded.copy(share_weights=True)
            if options.get("granularity") == "sublayer":
                scored = without_branches(working, list(key[1]), together, calibration, options)
            else:
                remove_layers(working.model, list(key[1]), working.adapter)
                scored = score(working, calibration, together, **options).results
            for name, result in scored.items():
                results[name, key[1]] = result
        return results[key]

    return rescore


def without_branches(working: LoadedModel, removed: list[str], metrics: list[str], calibration: Any,
                     options: dict[str, Any]) -> dict[str, MetricResult]:
    """``metrics``' branch scores of ``working`` without the branches ``removed`` (unit names of the
    model as first scored), named in that numbering: a layer left with no branch goes whole and the
    layers after it renumber, which the scores' units are mapped back through."""
    units = [parse_unit(name) for name in removed]
    whole = remove_branches(working.model, working.adapter, [],
                            [i for kind, i in units if kind == ATTENTION], [i for kind, i in units if kind == MLP])
    kept = [i for i in range(working.num_layers + len(whole)) if i not in whole]
    scored = score(working, calibration, metrics, **options).results
    renamed = {}
    for name, result in scored.items():
        named = [parse_unit(unit) for unit in result.units or []]
        renamed[name] = replace(result, units=[unit_name(kind, kept[i]) for kind, i in named])
    return renamed
