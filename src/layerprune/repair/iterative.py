"""Prune&Comp's iterative pruning: remove one layer, repair the cut, re-score the repaired model, repeat.

Plain iterative selection (:func:`layerprune.select`) re-scores a model that was only cut; here
each step's scores see the model *after* its repair, which is what lets Prune&Comp's rescaling
stabilise the next choice. Every step's statistics come from the current, already repaired model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from layerprune.models.loading import LoadedModel
from layerprune.repair import TokenRows, compensate
from layerprune.repair.config import DEFAULT_REPAIR
from layerprune.scoring import MetricResult, ScoreReport
from layerprune.selection import Selection, least_important, parse_remove, scored_metric


def compensate_iteratively(loaded: LoadedModel, report: ScoreReport, remove: int | str, method: str,
                           data: TokenRows | None, *, rescore: Callable[[str], MetricResult],
                           metric: str | None = None, options: Any = DEFAULT_REPAIR.options,
                           batch_size: int = DEFAULT_REPAIR.batch_size,
                           reason: str = "iterative selection") -> Selection:
    """Cut ``remove`` layers from ``loaded`` (scored in ``report``) one at a time, repairing each cut
    with ``method`` before the next scores; returns the selection in the model's indices as scored.

    ``rescore(metric)`` scores ``loaded`` as it is now (cut and repaired so far), on the data and
    options ``report`` was scored with."""
    name = scored_metric(metric, list(report.results))
    count = parse_remove(remove, report.num_layers)
    remaining = list(range(report.num_layers))
    result = report.results[name]
    steps: list[dict[str, Any]] = []
    for step in range(count):
        if step:
            result = rescore(name)
        victim = least_important(result.importance, 1)[0]
        steps.append({"layers": list(remaining), "importance": result.importance, "removed": remaining[victim]})
        compensate(loaded, [victim], method, data, options=options, batch_size=batch_size, reason=reason)
        remaining.pop(victim)
    return Selection(name, "iterative", sorted(step["removed"] for step in steps), steps)
