"""Training-free repair of a cut: ReplaceMe linear maps, Prune&Comp rescaling, LaCo merging.

    import layerprune as lp
    loaded = lp.load_model("smollm2-135m")
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=40, seq_len=256, sampling="contiguous")
    lp.compensate(loaded, [20, 21, 22], "replace-linear", rows)   # cuts and repairs in place
    lp.save(loaded, "out/smollm2-repaired")

:func:`compensate` reads the statistics from the model *before* the cut (one forward pass,
:mod:`.statistics`), folds the method's correction into layers the cut keeps, then removes the
layers by plain surgery: the result has exactly the parameters of plain removal and loads in
plain transformers. A scattered cut is repaired run by run, all runs from the same pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from layerprune.errors import UsageError, mention
from layerprune.progress import progress
from layerprune.models.lineage import ensure_lineage
from layerprune.models.editing import prune
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import check_sublayers, plan_branch_removal, present_branches
from layerprune.models.surgery import consecutive_runs, validate_layer_indices
from layerprune.registry import import_package_modules
from layerprune.repair.base import REPAIRS, unit_names
from layerprune.repair.config import DEFAULT_REPAIR, RepairConfig
from layerprune.repair.linear import ReplaceLinearOptions
from layerprune.repair.merge import MergeOptions
from layerprune.repair.statistics import RunStatistics, collect_statistics, collect_unit_statistics


class TokenRows(Protocol):
    """Calibration rows: a :class:`~layerprune.data.CalibrationSet` or a healing ``TrainingSet``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class RepairReport:
    """What one :func:`compensate` call did, as recorded in ``layerprune.json`` under ``repairs``:
    its config (method, batch, the method's options as run), data, runs and times."""

    config: RepairConfig
    data: dict[str, Any]
    runs: list[dict[str, Any]]
    summary: str
    seconds: float
    statistics_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**self.config.record(), "data": self.data, "runs": self.runs, "summary": self.summary,
                "seconds": round(self.seconds, 3), "statistics_seconds": round(self.statistics_seconds, 3)}


def describe_rows(data: TokenRows) -> dict[str, Any]:
    """Provenance of the calibration rows (a CalibrationSet knows its windows; a TrainingSet its source)."""
    describe = getattr(data, "describe", None)
    described = describe() if callable(describe) else {"source": str(getattr(data, "description", "tensors"))}
    return {**described, "tokens": int(data.attention_mask.sum())}


def _batches(data: TokenRows, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in progress(range(0, data.input_ids.shape[0], batch_size), "repair statistics", unit="batches"):
        yield data.input_ids[first:first + batch_size], data.attention_mask[first:first + batch_size]


def check_map_tokens(loaded: LoadedModel, tokens: int, method: str = "replace-linear") -> None:
    """Refuse fitting an H×H linear map on fewer real calibration tokens than the hidden size H
    (the system would be underdetermined)."""
    hidden = loaded.model.config.get_text_config().hidden_size
    if tokens < hidden:
        raise UsageError(f"{method} fits a {hidden}x{hidden} map but got only {tokens} calibration tokens, fewer "
                         f"than the hidden size {hidden}; raise {mention('samples')} or {mention('seq_len')}")


def collect_run_statistics(loaded: LoadedModel, runs: Iterable[tuple[int, int]], data: TokenRows, *,
                           batch_size: int = 8, linear: bool = True,
                           keep_tokens: bool = False) -> dict[tuple[int, int], RunStatistics]:
    """The statistics of every run ``[a, b)`` of ``loaded`` (its indices, uncut) on ``data``, from
    one pass, by run: what :func:`compensate` takes as ``statistics``. The runs may come from many
    different cuts; ``linear`` adds ``MᵀM``/``MᵀY`` to each run after layer 0. Refuses fewer real
    tokens than the hidden size when ``linear`` (a map of H×H would be underdetermined)."""
    distinct = sorted(set(runs))
    if linear:
        check_map_tokens(loaded, int(data.attention_mask.sum()))
    collected = collect_statistics(loaded.model, loaded.adapter, distinct, _batches(data, batch_size), linear=linear,
                                   keep_tokens=keep_tokens)
    return dict(zip(distinct, collected))


def check_repair(loaded: LoadedModel, layers: Iterable[int], method: str, options: Any = None) -> list[tuple[int, int]]:
    """Refuse a cut ``method`` cannot repair, before data or an original is loaded; returns the runs."""
    chosen = validate_layer_indices(layers, loaded.num_layers)
    runs = consecutive_runs(chosen)
    config = RepairConfig(method=method, options=options)
    config.repairer.check(loaded, runs, config.method_options)
    return runs


def branch_unit_runs(loaded: LoadedModel, layers: Iterable[int], attention: Iterable[int],
                     mlp: Iterable[int]) -> list[tuple[int, int]]:
    """A cut of whole ``layers`` and single branches (current indices) as runs ``[a, b)`` of units in the
    order the residual stream meets them (``2i``: layer ``i``'s attention, ``2i + 1``: its MLP), after
    the checks of the surgery (a family whose branches cannot be told apart, an index out of range or
    named twice, a cut that leaves no branch)."""
    layers, attention, mlp = list(layers), list(attention), list(mlp)
    check_sublayers(loaded.adapter)
    plan_branch_removal(present_branches(loaded.model, loaded.adapter), layers, attention, mlp)
    units = {2 * i for i in attention} | {2 * i + 1 for i in mlp} | {u for i in layers for u in (2 * i, 2 * i + 1)}
    return consecutive_runs(sorted(units))


def check_branch_repair(loaded: LoadedModel, layers: Iterable[int], attention: Iterable[int], mlp: Iterable[int],
                        method: str, options: Any = None) -> list[tuple[int, int]]:
    """:func:`check_repair` for a cut that removes branches; returns its runs of units."""
    runs = branch_unit_runs(loaded, layers, attention, mlp)
    config = RepairConfig(method=method, options=options)
    config.repairer.check_units(loaded, runs, config.method_options)
    return runs


def compensate(loaded: LoadedModel, layers: Iterable[int], method: str, data: TokenRows | None, *,
               options: Any = DEFAULT_REPAIR.options, batch_size: int = DEFAULT_REPAIR.batch_size,
               reason: str = "layers named by the user",
               statistics: Mapping[tuple[int, int], RunStatistics] | None = None,
               attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> RepairReport:
    """Cut ``layers`` (indices of ``loaded`` as loaded) from ``loaded`` in place and repair the cut
    with ``method`` (``replace-linear``, ``rescale`` or ``merge``), training-free.

    ``loaded`` before the cut is the original the statistics come from; ``data`` are the
    calibration rows (``merge`` reads none and accepts ``None``). ``options`` is the method's
    options class (``ReplaceLinearOptions``, ``MergeOptions``) or a mapping of them; by default its
    defaults. ``method``, ``options`` and ``batch_size`` are a :class:`RepairConfig`'s, so a config
    is passed as ``compensate(loaded, layers, data=rows, **dict(config))``; the ``repairs`` entry of
    ``layerprune.json`` records it.

    ``statistics``: the runs' statistics already collected from ``loaded`` on ``data`` by
    :func:`collect_run_statistics` (a search fits many cuts from one pass); by default one pass
    runs here.

    ``attention`` / ``mlp``: also remove the attention / the MLP of these layers (a sub-layer cut,
    as :func:`~layerprune.models.editing.prune` takes it), for a method that repairs branches
    (``rescale``, ``replace-linear``). The cut is then a sequence of removed runs of units in the order
    the residual stream meets them (``attn.0, mlp.0, attn.1, ...``; a whole layer is its two units),
    each repaired as a run of whole layers is: ``rescale`` compares the stream leaving the run with the
    stream entering it in the original and divides the kept branches after the run by that ``s``;
    ``replace-linear`` fits its map to the last kept branch before the run (an attention or an MLP) and
    folds it into that branch's output projection (``folded_into``). Each ``runs`` record names its
    ``units``.
    """
    config = RepairConfig(method=method, options=options, batch_size=batch_size)
    chosen = list(layers)
    attention, mlp = list(attention), list(mlp)
    if attention or mlp:
        if statistics is not None:
            raise UsageError("shared statistics are collected for runs of whole layers; a branch cut collects its own")
        return _compensate_branches(loaded, chosen, attention, mlp, config, data, reason)
    repairer, options = config.repairer, config.method_options
    runs = check_repair(loaded, chosen, method, options)
    original_ids = loaded.original_layer_ids
    began = time.perf_counter()
    run_statistics: list[RunStatistics] = []
    if repairer.needs_statistics:
        if data is None:
            raise UsageError(f"{method} estimates its repair on calibration data; pass calibration rows")
        if statistics is None:
            statistics = collect_run_statistics(loaded, runs, data, batch_size=batch_size,
                                                linear=repairer.linear_statistics,
                                                keep_tokens=repairer.keeps_tokens(options))
        run_statistics = [statistics[run] for run in runs]
        if repairer.linear_statistics and any(stats.gram is None for stats in run_statistics):
            raise ValueError(f"{method} needs the linear statistics (MᵀM, MᵀY), which were not collected")
        if repairer.keeps_tokens(options) and any(not stats.kept for stats in run_statistics):
            raise ValueError(f"{method} with these options needs the kept tokens, which were not collected")
    statistics_seconds = time.perf_counter() - began
    records, note = repairer.apply(loaded, runs, run_statistics, options)
    runs_json = [{"start": original_ids[start], "end": original_ids[end - 1] + 1,
                  **({"tokens": stats.tokens} if stats is not None else {}), **record}
                 for (start, end), stats, record in zip(runs, run_statistics or [None] * len(runs), records)]
    prune(loaded, chosen, reason)
    report = RepairReport(config, describe_rows(data) if data is not None else {}, runs_json, note,
                          time.perf_counter() - began, statistics_seconds)
    ensure_lineage(loaded).setdefault("repairs", []).append(report.to_json())
    return report


def _compensate_branches(loaded: LoadedModel, layers: list[int], attention: list[int], mlp: list[int],
                         config: RepairConfig, data: TokenRows | None, reason: str) -> RepairReport:
    """:func:`compensate` for a cut that removes branches: statistics at the unit boundaries, one pass."""
    repairer, options = config.repairer, config.method_options
    runs = check_branch_repair(loaded, layers, attention, mlp, config.method, options)
    began = time.perf_counter()
    run_statistics: list[RunStatistics] = []
    if repairer.needs_statistics:
        if data is None:
            raise UsageError(f"{config.method} estimates its repair on calibration data; pass calibration rows")
        if repairer.linear_statistics:
            check_map_tokens(loaded, int(data.attention_mask.sum()), config.method)
        run_statistics = collect_unit_statistics(loaded.model, loaded.adapter, runs, _batches(data, config.batch_size),
                                                 linear=repairer.linear_statistics,
                                                 keep_tokens=repairer.keeps_tokens(options))
    statistics_seconds = time.perf_counter() - began
    records, note = repairer.apply_units(loaded, runs, run_statistics, options)
    runs_json = [{"units": unit_names(loaded, start, end),
                  **({"tokens": stats.tokens} if stats is not None else {}), **record}
                 for (start, end), stats, record in zip(runs, run_statistics or [None] * len(runs), records)]
    prune(loaded, layers, reason, attention=attention, mlp=mlp)
    report = RepairReport(config, describe_rows(data) if data is not None else {}, runs_json, note,
                          time.perf_counter() - began, statistics_seconds)
    ensure_lineage(loaded).setdefault("repairs", []).append(report.to_json())
    return report


__all__ = ["DEFAULT_REPAIR", "REPAIRS", "MergeOptions", "RepairConfig", "RepairReport", "ReplaceLinearOptions", "RunStatistics", "check_map_tokens",
           "branch_unit_runs", "check_branch_repair", "check_repair", "collect_run_statistics", "compensate"]

import_package_modules(__name__, __path__)  # a repair method registers itself by existing: one file adds one
