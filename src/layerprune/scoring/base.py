"""What a layer-importance metric is, and the shared state metrics of one run can reuse.

Convention, for every metric: ``MetricResult.importance[i]`` is the importance of decoder layer
``i`` and **higher means more important** (keep it); selection removes the lowest. Each metric
also keeps its raw values (``values``: what the paper reports, e.g. BI, a perplexity, or a table
of block distances) with a sentence saying which direction they run, so the JSON is readable
without this code.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.options import build_options, options_of, refuse_unknown
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
    units: list[str] | None = None
    """At sub-layer granularity, the branch each value belongs to (``attn.3``, ``mlp.3``, layers as
    scored); None: one value per layer."""

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
    that ``bi``, ``angular`` and ``block-cosine`` come from one forward pass together.

    ``options`` holds the value of every option the run's metrics declare (given or default);
    a metric reads its own through :meth:`options_of`.
    """

    loaded: LoadedModel
    calibration: CalibrationSet | None
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    def data(self, metric: str) -> CalibrationSet:
        if self.calibration is None:
            raise UsageError(f"metric {metric!r} needs calibration data; pass calibration rows (e.g. "
                             "build_calibration's; on the command line --data)")
        return self.calibration

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def options_of(self, metric: Metric) -> Any:
        """``metric``'s options (an instance of its ``options_class``) for this run."""
        assert metric.options_class is not None, f"{type(metric).__name__} declares no options"
        return metric.options_class(**{o.name: self.options[o.name] for o in options_of(metric.options_class)})


class LayerPass:
    """A metric's share of layer streaming (:mod:`layerprune.scoring.streaming`), which loads one
    decoder layer at a time and pushes every calibration batch through it.

    The streaming loop calls :meth:`on_layer` once per loaded layer and, where
    ``needs_activations``, :meth:`on_batch` for every batch; :meth:`finish` then leaves in the
    scoring context what the metric's own :meth:`Metric.compute` reads, so a streamed score and an
    in-memory one are the same code from there on. Metrics that share a pass return the same
    object (the loop runs each pass once).
    """

    needs_activations: bool = True

    def on_layer(self, index: int, layer: nn.Module) -> None:
        """Decoder layer ``index`` is loaded with its real weights."""

    def on_batch(self, index: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, layer: nn.Module,
                 stream: Stream) -> None:
        """Layer ``index`` turned batch ``batch``'s input ``x_in`` into ``x_out``."""

    def finish(self, stream: Stream) -> None:
        """Every layer has passed: sum across processes and fill the context's cache."""


class Stream(Protocol):
    """What a :class:`LayerPass` may use of the streaming run (implemented in :mod:`.streaming`)."""

    store: Any
    """Tensors kept between layers, by key: ``put(key, tensor)``, ``get(key)`` (memory or spill files)."""
    batches: list[Any]
    """Per calibration batch: ``attention_mask``, next-token ``where``/``targets`` and the layers' ``calls``."""

    def hidden(self, batch: int) -> torch.Tensor:
        """Batch ``batch``'s hidden state after the last layer streamed so far (the full model's, at the end)."""

    def replay(self, layer: nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder ``layer`` (number ``index``) on ``hidden`` with batch ``batch``'s extra arguments."""

    def head(self) -> AbstractContextManager[Any]:
        """The final norm and LM head with real weights (a :class:`~.forward.Head`), while open."""

    def all_reduce(self, *tensors: torch.Tensor) -> None:
        """Sum ``tensors`` in place across the processes sharing the rows (none: nothing to do)."""


class Metric:
    """A layer-importance metric: subclass, set the class attributes, implement :meth:`compute`,
    and register an instance in :data:`METRICS`.

    ``options_class`` declares the metric's options (see :mod:`layerprune.options`). A metric that
    can run under layer streaming sets ``streaming_refusal = None`` and either needs nothing from
    the layers (``layer_pass`` returns ``None`` and ``compute`` runs on the weightless skeleton) or
    returns the :class:`LayerPass` that fills what ``compute`` reads; otherwise ``streaming_refusal``
    says why it cannot stream.
    """

    options_class: type | None = None
    needs_data: bool = True
    meaning: str = ""
    streaming_refusal: str | None = "it declares no way to run layer by layer"
    shared_pass: str | None = None
    """The name of the pass this metric shares with others (``bi``, ``angular`` and ``block-cosine``:
    ``"similarity"``). Metrics of one pass are scored together for the cost of one, so a re-scoring
    (:func:`~layerprune.scoring.rescorer`) scores them all at once."""
    costly: bool = False
    """True when one scoring costs several forward passes (``ppl``: about half the layers' worth;
    ``taylor``: a backward pass as well): a search re-scores it iteratively only when asked."""
    baseline: bool = False
    """True for a reference every metric must beat (``random``, ``reverse-order``): a search does not
    offer its selections as candidates."""
    sublayer_refusal: str | None = "scores whole layers only"
    """Why the metric cannot score attention and MLP branches apart (None: :meth:`compute_branches` does)."""

    def forward_passes(self, units: int, head_ratio: float = 0.0) -> float:
        """About how many forward passes of the decoder over the calibration rows one scoring of a model
        of ``units`` (layers, or at sub-layer granularity branches) costs, where the LM head costs
        ``head_ratio`` decoder passes: what a search with a time budget asks for before scoring it."""
        return 1.0 if self.needs_data else 0.0

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        raise NotImplementedError

    def layer_pass(self, context: ScoringContext, name: str) -> LayerPass | None:
        return None

    def compute_branches(self, context: ScoringContext, name: str) -> MetricResult:
        """One value per branch the model still computes (``units`` names them), where
        ``sublayer_refusal`` is None."""
        raise NotImplementedError


METRICS: Registry[Metric] = Registry("metric")


def metric_options(names: list[str], values: dict[str, Any]) -> dict[str, Any]:
    """Every option the registered metrics declare, valued from ``values`` or its default, after
    checking each given value against its declaration (an option no metric declares is refused)."""
    declared = {o.name: o for metric in METRICS.names() for o in options_of(METRICS.get(metric).options_class)}
    refuse_unknown(values, declared, unit="scoring")
    unit = ", ".join(names) or "scoring"
    for name, value in values.items():
        declared[name].check(value, unit)
    resolved = {name: values.get(name, option.default) for name, option in declared.items()}
    for metric in names:  # rules between options, per metric
        options_class = METRICS.get(metric).options_class
        if options_class is not None:
            build_options(options_class, {o.name: resolved[o.name] for o in options_of(options_class)}, unit=metric)
    return resolved
