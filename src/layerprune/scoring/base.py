"""What a layer-importance metric is, and the shared state metrics of one run can reuse.

Convention, for every metric: ``MetricResult.importance[i]`` is the importance of decoder layer
``i`` and **higher means more important** (keep it); selection removes the lowest. Each metric
also keeps its raw values (``values``: what the paper reports, e.g. BI, a perplexity, or a table
of block distances) with a sentence saying which direction they run, so the JSON is readable
without this code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.registry import Registry
from layerprune.data import CalibrationSet

T = TypeVar("T")
BlockTable = dict[int, list[float]]


@dataclass(frozen=True)
class MetricResult:
    """One metric's scores for every layer of the model as scored.

    ``blocks[n][i]``, when given, is the importance of the run of ``n`` layers starting at ``i``
    (higher = more important, so the consecutive strategy removes the lowest); metrics that only
    score single layers leave it empty and a run's importance is the sum over its layers.
    """

    name: str
    importance: list[float]
    values: list[float] | BlockTable
    meaning: str
    blocks: BlockTable | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def block_importance(self, n: int) -> list[float]:
        if self.blocks is not None:
            return self.blocks[n]
        return [sum(self.importance[i:i + n]) for i in range(len(self.importance) - n + 1)]

    def values_json(self) -> list[float] | dict[str, list[float]]:
        if isinstance(self.values, dict):
            return {str(n): row for n, row in self.values.items()}
        return self.values


@dataclass
class ScoringContext:
    """Everything metrics of one run share: the model, the data, the options, and a cache so
    that ``bi``, ``angular`` and ``block-cosine`` come from one forward pass together."""

    loaded: LoadedModel
    calibration: CalibrationSet | None
    batch_size: int = 8
    positions: str = "all"
    seed: int = 0
    _cache: dict[str, Any] = field(default_factory=dict)

    def data(self, metric: str) -> CalibrationSet:
        if self.calibration is None:
            raise UsageError(f"metric {metric!r} needs calibration data; pass --data (e.g. --data wiki-sample)")
        return self.calibration

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


class Metric:
    """A layer-importance metric: subclass, set the class attributes, implement :meth:`compute`,
    and register an instance in :data:`METRICS`."""

    needs_data: bool = True
    meaning: str = ""

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        raise NotImplementedError


METRICS: Registry[Metric] = Registry("metric")
