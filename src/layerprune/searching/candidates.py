"""The candidates a search ranks: every metric's selection under every strategy, de-duplicated by
the layers they remove, each also with every training-free repair that applies.

All metrics are scored in one :func:`layerprune.score` call on one calibration set, so the
similarity metrics (``bi``, ``angular``, ``block-cosine``) share their one forward pass. The
baselines (``random``, ``reverse-order``) are references a metric must beat, not candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerprune.errors import UsageError
from layerprune.models.editing import prune
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import consecutive_runs
from layerprune.repair import REPAIRS, check_map_tokens, check_repair, collect_run_statistics, compensate
from layerprune.repair.statistics import RunStatistics
from layerprune.scoring import METRICS, ScoreReport
from layerprune.selection import STRATEGIES, Rescore, Selection, Strategy, select


EVOLVED = "evolution"
"""The strategy a cut an evolutionary search found (no heuristic chose it) is labelled with."""


def candidate_metrics() -> list[str]:
    """Every registered metric except the baselines (``random``, ``reverse-order``): references a metric
    must beat, not candidates."""
    return [name for name in METRICS.names() if not METRICS.get(name).baseline]


def strategies_cheapest_first() -> list[tuple[str, Strategy]]:
    """The selection strategies, those that only read the scores first (cheap, so their candidates come
    first), then those that re-score the smaller model once per removed layer; registration order within."""
    return sorted(STRATEGIES.registered(), key=lambda pair: pair[1].rescores)


@dataclass
class Candidate:
    """One cut to rank: the layers (indices of the model as loaded), how they were found, and the
    training-free repair applied to the cut (``None``: plain removal)."""

    remove: list[int]
    metric: str
    strategy: str
    repair: str | None = None
    also_found_by: list[str] = field(default_factory=list)
    """Other ``metric/strategy`` pairs that chose the same layers (de-duplicated into this one)."""
    fitness: float | None = None
    """An evolutionary search's fitness of the cut on calibration rows (lower is better); ``None`` otherwise."""

    @property
    def label(self) -> str:
        found = f"{self.metric}/{self.strategy}"
        return f"{found}+{self.repair}" if self.repair else found

    def to_json(self) -> dict[str, Any]:
        return {"removed_layers": self.remove, "metric": self.metric, "strategy": self.strategy,
                "repair": self.repair, "also_found_by": self.also_found_by, "fitness": self.fitness}


def unique_selections(report: ScoreReport, count: int, rescore: Rescore, out_of_time: Callable[[], bool] = lambda: False,
                      *, exhaustive: bool = False) -> tuple[list[Selection], dict[str, str]]:
    """Every metric's selection of ``count`` layers, one-shot strategies first; and the
    ``metric/strategy`` pairs not selected, with the reason.

    A re-scoring selection costs ``count - 1`` scorings of smaller models: for a ``costly`` metric
    (``ppl``, ``taylor``) that is many times the whole search, so those run only when
    ``exhaustive``; ``out_of_time`` (whether the budget leaves too little for one) is asked before each
    one that runs."""
    selections: list[Selection] = []
    not_made: dict[str, str] = {}
    for strategy, unit in strategies_cheapest_first():
        for metric in report.results:
            pair = f"{metric}/{strategy}"
            if unit.rescores and METRICS.get(metric).costly and not exhaustive:
                not_made[pair] = ("re-scoring this metric after every removal costs several times the search; "
                                  "the exhaustive option includes it")
            elif unit.rescores and out_of_time():
                not_made[pair] = "the time budget left too little for this re-scoring selection"
            else:
                selections.append(select(report, count, strategy, metric, rescore=rescore))
    return selections, not_made


def plain_candidates(selections: list[Selection]) -> list[Candidate]:
    """One plain-removal candidate per distinct layer set, in the order the selections came."""
    by_layers: dict[tuple[int, ...], Candidate] = {}
    for selection in selections:
        key = tuple(selection.remove)
        if key in by_layers:
            by_layers[key].also_found_by.append(f"{selection.metric}/{selection.strategy}")
        else:
            by_layers[key] = Candidate(list(selection.remove), selection.metric, selection.strategy)
    return list(by_layers.values())


def repaired_candidates(loaded: LoadedModel, plain: list[Candidate], repairs: list[str],
                        tokens: int) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Each plain candidate once more with every repair in ``repairs`` that accepts its cut and the
    ``tokens`` real calibration tokens (a linear map needs at least the hidden size); a refused one
    is returned as the candidate's record with the repair and the ``reason`` (the method's own words)."""

    repaired, skipped = [], []
    for repair in repairs:
        for candidate in plain:
            try:
                if REPAIRS.get(repair).linear_statistics:
                    check_map_tokens(loaded, tokens, repair)
                check_repair(loaded, candidate.remove, repair)
            except UsageError as refusal:
                skipped.append({**candidate.to_json(), "repair": repair, "reason": str(refusal)})
                continue
            repaired.append(Candidate(candidate.remove, candidate.metric, candidate.strategy, repair,
                                      list(candidate.also_found_by), candidate.fitness))
    return repaired, skipped


def available_repairs() -> list[str]:
    """The training-free repair methods, cheapest first (each declares its ``cost``)."""

    return [name for name, _ in sorted(REPAIRS.registered(), key=lambda pair: (pair[1].cost, pair[0]))]


def cut(loaded: LoadedModel, candidate: Candidate, calibration: Any, batch_size: int,
        statistics: Mapping[tuple[int, int], RunStatistics] | None = None) -> LoadedModel:
    """A copy of ``loaded`` with ``candidate`` applied: plain removal, or removal repaired with its
    method on ``calibration`` (the rows the metrics were scored on, never the ranking windows),
    from ``statistics`` when given (:func:`repair_statistics`). ``loaded`` itself stays whole."""

    working = loaded.copy(share_weights=candidate.repair is None)  # a repair writes into kept layers
    reason = f"{candidate.metric} scores, {candidate.strategy} selection (layerprune search)"
    if candidate.repair is None:
        prune(working, candidate.remove, reason=reason)
    else:

        compensate(working, candidate.remove, candidate.repair, calibration, batch_size=batch_size, reason=reason,
                   statistics=statistics)
    return working


def repair_statistics(loaded: LoadedModel, candidates: list[Candidate], calibration: Any,
                      batch_size: int) -> dict[tuple[int, int], RunStatistics]:
    """The statistics of every removed run of every repaired candidate that reads data, from one
    pass of ``loaded``: the statistics depend only on the run and the original, so a run shared
    by several cuts (or methods) is summed once."""

    runs = {run for candidate in candidates if candidate.repair is not None and REPAIRS.get(candidate.repair).needs_statistics
            for run in consecutive_runs(candidate.remove)}
    if not runs:
        return {}
    linear = any(REPAIRS.get(c.repair).linear_statistics for c in candidates if c.repair is not None)
    return collect_run_statistics(loaded, runs, calibration, batch_size=batch_size, linear=linear)
