"""The candidates a search ranks: every metric's selection under every strategy, de-duplicated by
what they remove (whole layers, or at sub-layer granularity attention and MLP branches), each also
with every training-free repair that applies (to a cut of branches, those that repair one).

All metrics are scored in one :func:`layerprune.score` call on one calibration set, so the
similarity metrics (``bi``, ``angular``, ``block-cosine``) share their one forward pass. The
baselines (``random``, ``reverse-order``) are references a metric must beat, not candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Any

from layerprune.errors import UsageError
from layerprune.models.editing import prune
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import ATTENTION, KINDS, MLP, split_units, unit_name
from layerprune.models.surgery import consecutive_runs
from layerprune.repair import (REPAIRS, check_branch_repair, check_map_tokens, check_repair, collect_run_statistics,
                               compensate)
from layerprune.repair.statistics import RunStatistics
from layerprune.scoring import METRICS, ScoreReport
from layerprune.selection import STRATEGIES, Rescore, Selection, Strategy, select


EVOLVED = "evolution"
"""The strategy a cut an evolutionary search found (no heuristic chose it) is labelled with."""


def candidate_metrics(granularity: str = "layer") -> list[str]:
    """Every registered metric except the baselines (``random``, ``reverse-order``): references a metric
    must beat, not candidates; at ``sublayer`` granularity only those that score branches."""
    return [name for name in METRICS.names() if not METRICS.get(name).baseline
            and (granularity == "layer" or METRICS.get(name).sublayer_refusal is None)]


def strategies_cheapest_first() -> list[tuple[str, Strategy]]:
    """The selection strategies, those that only read the scores first (cheap, so their candidates come
    first), then those that re-score the smaller model once per removed layer; registration order within."""
    return sorted(STRATEGIES.registered(), key=lambda pair: pair[1].rescores)


@dataclass
class Candidate:
    """One cut to rank: the layers (indices of the model as loaded) and, in a sub-layer cut, the layers
    whose attention or MLP alone goes; how it was found; and the training-free repair applied to the
    cut (``None``: plain removal)."""

    remove: list[int]
    metric: str
    strategy: str
    repair: str | None = None
    also_found_by: list[str] = field(default_factory=list)
    """Other finders (:attr:`finder`) that chose the same cut (de-duplicated into this one)."""
    fitness: float | None = None
    """An evolutionary search's fitness of the cut on calibration rows (lower is better); ``None`` otherwise."""
    attention: list[int] = field(default_factory=list)
    """Layers whose attention alone the cut removes (their MLP stays)."""
    mlp: list[int] = field(default_factory=list)
    """Layers whose MLP alone the cut removes (their attention stays)."""
    granularity: str = "layer"
    """What its finder chose among: whole layers, or attention and MLP branches (``sublayer``)."""

    @property
    def finder(self) -> str:
        """``metric/strategy``, marked when it chose among branches."""
        found = f"{self.metric}/{self.strategy}"
        return f"{found} (sub-layer)" if self.granularity == "sublayer" else found

    @property
    def label(self) -> str:
        return f"{self.finder}+{self.repair}" if self.repair else self.finder

    @property
    def key(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """What the cut removes (whole layers, lone attentions, lone MLPs): equal keys, equal models."""
        return tuple(self.remove), tuple(self.attention), tuple(self.mlp)

    @property
    def shape(self) -> tuple[int, int, int]:
        """How many whole layers, lone attentions and lone MLPs the cut removes: what its speed depends on."""
        return len(self.remove), len(self.attention), len(self.mlp)

    @property
    def removes_branches(self) -> bool:
        """Whether the cut removes a lone attention or MLP (not only whole layers): its repair is one of a
        cut of branches, which collects its own statistics."""
        return bool(self.attention or self.mlp)

    @property
    def removed(self) -> str:
        return removed_text(self.remove, self.attention, self.mlp)

    def units(self) -> frozenset[str]:
        """The cut as branch units (a whole layer as both of its branches): an evolution over branches."""
        return frozenset({*(unit_name(kind, i) for i in self.remove for kind in KINDS),
                          *(unit_name(ATTENTION, i) for i in self.attention), *(unit_name(MLP, i) for i in self.mlp)})

    def to_json(self) -> dict[str, Any]:
        return {"removed_layers": self.remove, "removed_attention": self.attention, "removed_mlp": self.mlp,
                "granularity": self.granularity, "metric": self.metric, "strategy": self.strategy,
                "repair": self.repair, "also_found_by": self.also_found_by, "fitness": self.fitness}


def removed_text(layers: list[int], attention: list[int], mlp: list[int]) -> str:
    """What a cut removes, in words: ``layers 2,4; attention of 1; MLP of 3,5``."""
    parts = [(what, indices) for what, indices in (("layers", layers), ("attention of", attention), ("MLP of", mlp))
             if indices]
    return "; ".join(f"{what} {','.join(map(str, indices))}" for what, indices in parts)


def unit_candidate(units: Iterable[Hashable], metric: str, strategy: str, granularity: str,
                   **extra: Any) -> Candidate:
    """The candidate that removes ``units`` (layer indices or branch names ``attn.i``/``mlp.i``), a
    layer whose both branches are named going whole."""
    whole, lone = split_units(units)
    return Candidate(sorted(whole), metric, strategy, attention=[i for i, kind in lone.items() if kind == ATTENTION],
                     mlp=[i for i, kind in lone.items() if kind == MLP], granularity=granularity, **extra)


def unique_selections(report: ScoreReport, remove: int | str, rescore: Rescore,
                      out_of_time: Callable[[], bool] = lambda: False, *,
                      exhaustive: bool = False) -> tuple[list[Selection], dict[str, str]]:
    """Every metric's selection of ``remove`` (a layer count, or at sub-layer granularity that many
    layers' worth of parameters or a share of them), one-shot strategies first; and the
    ``metric/strategy`` pairs not selected, with the reason.

    A re-scoring selection costs a scoring of a smaller model per unit removed: for a ``costly`` metric
    (``ppl``, ``taylor``) that is many times the whole search, so those run only when
    ``exhaustive``; ``out_of_time`` (whether the budget leaves too little for one) is asked before each
    one that runs. A report of branches (``report.units``) is selected from by the strategies whose rule
    reads for single branches."""
    selections: list[Selection] = []
    not_made: dict[str, str] = {}
    branches = report.units is not None
    for strategy, unit in strategies_cheapest_first():
        for metric in report.results:
            pair = f"{metric}/{strategy}" + (" (sub-layer)" if branches else "")
            if branches and not unit.branches:
                not_made[pair] = "this strategy picks runs of whole layers; it has no sub-layer selection"
            elif unit.rescores and METRICS.get(metric).costly and not exhaustive:
                not_made[pair] = ("re-scoring this metric after every removal costs several times the search; "
                                  "the exhaustive option includes it")
            elif unit.rescores and out_of_time():
                not_made[pair] = "the time budget left too little for this re-scoring selection"
            else:
                selections.append(select(report, remove, strategy, metric, rescore=rescore))
    return selections, not_made


def plain_candidates(selections: list[Selection]) -> list[Candidate]:
    """One plain-removal candidate per distinct cut (a selection of branches that takes both of a layer's
    is the whole-layer cut, and found with it), whole-layer and sub-layer cuts taken in turns, each kind
    in the order its selections came: a time budget that ranks only the first few still ranks both kinds,
    rather than the whole-layer cuts alone (they are selected first)."""
    by_cut: dict[tuple[tuple[int, ...], ...], Candidate] = {}
    for selection in selections:
        candidate = (unit_candidate(selection.units, selection.metric, selection.strategy, "sublayer")
                     if selection.units else Candidate(list(selection.remove), selection.metric, selection.strategy))
        if candidate.key in by_cut:
            by_cut[candidate.key].also_found_by.append(candidate.finder)
        else:
            by_cut[candidate.key] = candidate
    kinds = [[c for c in by_cut.values() if c.granularity == kind] for kind in ("layer", "sublayer")]
    return [candidate for turn in zip_longest(*kinds) for candidate in turn if candidate is not None]


def repaired_candidates(loaded: LoadedModel, plain: list[Candidate], repairs: list[str],
                        tokens: int) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Each plain candidate once more with every repair in ``repairs`` that accepts its cut (a cut of
    branches: a method that repairs one, checked as :func:`compensate` checks it) and the ``tokens``
    real calibration tokens (a linear map needs at least the hidden size); a refused one is returned
    as the candidate's record with the repair and the ``reason`` (the method's own words)."""

    repaired, skipped = [], []
    for repair in repairs:
        for candidate in plain:
            try:
                if REPAIRS.get(repair).linear_statistics:
                    check_map_tokens(loaded, tokens, repair)
                if candidate.removes_branches:
                    check_branch_repair(loaded, candidate.remove, candidate.attention, candidate.mlp, repair)
                else:
                    check_repair(loaded, candidate.remove, repair)
            except UsageError as refusal:
                skipped.append({**candidate.to_json(), "repair": repair, "reason": str(refusal)})
                continue
            repaired.append(replace(candidate, repair=repair, also_found_by=list(candidate.also_found_by)))
    return repaired, skipped


def available_repairs() -> list[str]:
    """The training-free repair methods, cheapest first (each declares its ``cost``)."""

    return [name for name, _ in sorted(REPAIRS.registered(), key=lambda pair: (pair[1].cost, pair[0]))]


def cut(loaded: LoadedModel, candidate: Candidate, calibration: Any, batch_size: int,
        statistics: Mapping[tuple[int, int], RunStatistics] | None = None) -> LoadedModel:
    """A copy of ``loaded`` with ``candidate`` applied: plain removal, or removal repaired with its
    method on ``calibration`` (the rows the metrics were scored on, never the ranking windows),
    from ``statistics`` when given (:func:`repair_statistics`; a cut of branches collects its own).
    ``loaded`` itself stays whole."""

    working = loaded.copy(share_weights=candidate.repair is None)  # a repair writes into kept layers
    among = " of branches" if candidate.granularity == "sublayer" else ""
    reason = f"{candidate.metric} scores, {candidate.strategy} selection{among} (layerprune search)"
    if candidate.repair is None:
        prune(working, candidate.remove, reason=reason, attention=candidate.attention, mlp=candidate.mlp)
    else:
        compensate(working, candidate.remove, candidate.repair, calibration, batch_size=batch_size, reason=reason,
                   statistics=None if candidate.removes_branches else statistics, attention=candidate.attention,
                   mlp=candidate.mlp)
    return working


def repair_statistics(loaded: LoadedModel, candidates: list[Candidate], calibration: Any,
                      batch_size: int) -> dict[tuple[int, int], RunStatistics]:
    """The statistics of every removed run of every repaired cut of whole layers that reads data, from
    one pass of ``loaded``: the statistics depend only on the run and the original, so a run shared
    by several cuts (or methods) is summed once. A cut of branches collects its own (:func:`cut`)."""

    shared = [candidate for candidate in candidates if candidate.repair is not None and not candidate.removes_branches
              and REPAIRS.get(candidate.repair).needs_statistics]
    runs = {run for candidate in shared for run in consecutive_runs(candidate.remove)}
    if not runs:
        return {}
    linear = any(REPAIRS.get(candidate.repair).linear_statistics for candidate in shared)
    return collect_run_statistics(loaded, runs, calibration, batch_size=batch_size, linear=linear)
