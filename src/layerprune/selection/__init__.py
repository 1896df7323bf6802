"""Turning layer scores into the layers to remove.

Each strategy is one registered unit in :data:`STRATEGIES`:

- ``independent`` (ShortGPT): the N layers with the lowest importance, wherever they are.
- ``consecutive`` (LLM-Streamline, Gromov et al.): the run of N adjacent layers that matters least;
  for block metrics (``angular``, ``block-cosine``) that is the start whose n=N block changes its
  input least, for per-layer metrics the run with the lowest summed importance.
- ``iterative`` (SLEB, Reassessing Layer Pruning): remove the least important layer, re-score the
  smaller model with the same metric and data, and repeat N times. The scores are plain data, so
  the re-scoring is a function the caller passes (:func:`layerprune.scoring.rescorer`).

Indices are those of the model as scored (what :func:`layerprune.prune` takes). A new strategy is one
new module in this package that registers itself in :data:`STRATEGIES` (imported at the end of this
file); ``rescores`` tells a search to try it after the strategies that only read the scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, overload

from layerprune.errors import OptionError, UsageError
from layerprune.models.sublayers import ATTENTION, MLP, parse_unit, unit_name
from layerprune.options import Config, Parse, Registered, comma_ints, option
from layerprune.registry import Registry, import_package_modules
from layerprune.scoring.base import MetricResult
from layerprune.scoring.report import ScoreReport

_REMOVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")

Rescore = Callable[[str, list[int]], MetricResult]
"""``rescore(metric, removed)``: ``metric``'s scores of the model as scored without the layers
``removed`` (its indices); see :func:`layerprune.scoring.rescorer`."""

Choice = tuple[list[int], list[dict[str, Any]]]
"""What a strategy returns: the layers to remove (sorted) and its steps (empty for one-shot strategies)."""


@dataclass(frozen=True)
class Selection:
    """The layers (or, at sub-layer granularity, the branches ``units``) chosen for removal, and how
    they were chosen."""

    metric: str
    strategy: str
    remove: list[int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    """The branches chosen (``attn.N``, ``mlp.N``, layers as scored); ``remove`` is then empty, unless the
    cut was given (whole layers beside single branches)."""

    def branches(self, kind: str) -> list[int]:
        """The layers whose ``kind`` branch (``attention`` or ``mlp``) was chosen, sorted."""
        return sorted(index for unit_kind, index in map(parse_unit, self.units) if unit_kind == kind)

    def marked(self, labels: list[str]) -> set[int]:
        """Positions of the chosen layers or branches among a report's ``labels`` (layers: their index)."""
        chosen = set(self.units) if self.units else {str(index) for index in self.remove}
        return {position for position, label in enumerate(labels) if label in chosen}

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"metric": self.metric, "strategy": self.strategy, "remove": self.remove}
        if self.units:
            document.update(units=self.units, attention=self.branches(ATTENTION), mlp=self.branches(MLP))
        if self.steps:
            document["steps"] = self.steps
        return document


class Strategy:
    """A way to choose ``count`` layers from one metric's scores: subclass, implement :meth:`choose`,
    and register an instance in :data:`STRATEGIES`. ``options_class`` declares its options, if any."""

    options_class: type | None = None
    rescores: bool = False
    """True when :meth:`choose` needs a ``rescore`` function (it scores smaller models itself)."""
    branches: bool = False
    """True when its rule reads for single branches too (:func:`select_branches`): the least important
    first, re-scoring after each where it ``rescores``; a strategy of runs of whole layers is not."""

    def choose(self, result: MetricResult, count: int, rescore: Rescore | None) -> Choice:
        raise NotImplementedError


STRATEGIES: Registry[Strategy] = Registry("strategy")


def check_remove(remove: int | str) -> tuple[float, bool]:
    """Read ``--remove`` without knowing the model: ``(value, is_percentage)``."""
    match = _REMOVE.match(str(remove))
    if match is None or (not match.group(2) and "." in match.group(1)):
        raise OptionError.about("remove", f"{remove!r} cannot be read; give a layer count (8) or a share (25%)")
    value, percent = float(match.group(1)), bool(match.group(2))
    if value <= 0 or (percent and value >= 100):
        raise OptionError.about("remove", f"{remove} must be more than 0 and less than all layers (100%)")
    return value, percent


def parse_remove(remove: int | str, num_layers: int) -> int:
    """``8`` or ``"8"`` layers, or ``"25%"`` of ``num_layers``; 1 <= N < num_layers.

    A share is rounded to the nearest layer, halves up: 25% of 30 layers is 8, as the papers count
    (Reassessing Layer Pruning's "last 25%"); rounding down would make 25% of 30 mean 23%.
    """
    value, percent = check_remove(remove)
    count = math.floor(num_layers * value / 100 + 0.5 + 1e-9) if percent else int(value)
    if count < 1:
        raise OptionError.about("remove", f"{remove} of a {num_layers}-layer model removes no layer; ask for at least "
                                          "one")
    if count >= num_layers:
        raise OptionError.about("remove", f"{remove} would remove all {num_layers} layers; keep at least one")
    return count


def scored_metric(metric: str | None, scored: list[str]) -> str:
    """The metric to select by: ``metric``, or the first of ``scored``; refused if it was not scored
    (a recipe knows ``scored`` from its score section before anything runs)."""
    name = metric or scored[0]
    if name not in scored:
        raise UsageError(f"metric {name!r} was not scored; score it too (scored: {', '.join(scored)})")
    return name


def least_important(importance: list[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest values (ties go to the lower index), sorted."""
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    return sorted(order[:count])


def least_important_run(result: MetricResult, count: int) -> list[int]:
    """The run of ``count`` adjacent layers with the lowest block importance."""
    blocks = result.block_importance(count)
    start = min(range(len(blocks)), key=lambda i: (blocks[i], i))
    return list(range(start, start + count))


class Independent(Strategy):
    """The ``count`` least important layers, wherever they are (ShortGPT)."""

    branches = True

    def choose(self, result: MetricResult, count: int, rescore: Rescore | None) -> Choice:
        return least_important(result.importance, count), []


class Consecutive(Strategy):
    """The run of ``count`` adjacent layers that matters least (LLM-Streamline, Gromov et al.)."""

    def choose(self, result: MetricResult, count: int, rescore: Rescore | None) -> Choice:
        return least_important_run(result, count), []


class Iterative(Strategy):
    """Remove the least important layer, re-score the rest, repeat; step 0 uses the given scores."""

    rescores = True
    branches = True

    def choose(self, result: MetricResult, count: int, rescore: Rescore | None) -> Choice:
        assert rescore is not None, "select() refuses the iterative strategy without a rescore function"
        remaining = list(range(len(result.importance)))
        steps: list[dict[str, Any]] = []
        for step in range(count):
            if step:
                result = rescore(result.name, sorted(s["removed"] for s in steps))
            victim = least_important(result.importance, 1)[0]
            steps.append({"layers": list(remaining), "importance": result.importance, "removed": remaining[victim]})
            remaining.pop(victim)
        return sorted(s["removed"] for s in steps), steps


STRATEGIES.register("independent")(Independent())
STRATEGIES.register("consecutive")(Consecutive())
STRATEGIES.register("iterative")(Iterative())


class SelectConfig(Config):
    """How many layers go, chosen how, by which metric: the one declaration of the selection
    stage's options. :func:`select` builds it from its keywords (whose defaults are its
    declarations), a recipe's ``select`` section is read as its keys and ``layerprune score`` /
    ``prune`` make ``--remove``, ``--strategy`` and ``--select-by`` from it."""

    unit = "select"

    remove: Annotated[int | str | None, Parse(str)] = option(
        None, "layers to remove: a count (8) or a share (25%); none: choose no layers")
    strategy: Annotated[str, Registered(STRATEGIES)] = option(
        "independent", "independent: the N least important layers (ShortGPT); consecutive: the best run of N layers "
        "(LLM-Streamline, Gromov); iterative: remove one, re-score, repeat (SLEB)")
    metric: str | None = option(None, "the scored metric that picks the layers to remove (none: the first scored)",
                                flag="--select-by")
    layers: Annotated[tuple[int, ...] | None, Parse(comma_ints)] = option(
        None, "these layers (indices as loaded) instead of a choice from scores: how a recipe replays a cut found "
        "otherwise, e.g. by an evolutionary search", metavar="I,J,...")
    attention: Annotated[tuple[int, ...] | None, Parse(comma_ints)] = option(
        None, "these layers' attention (their MLP stays), beside or instead of layers: how a recipe replays a "
        "sub-layer cut a search found", metavar="I,J,...")
    mlp: Annotated[tuple[int, ...] | None, Parse(comma_ints)] = option(
        None, "these layers' MLP (their attention stays), beside or instead of layers: how a recipe replays a "
        "sub-layer cut a search found", metavar="I,J,...")

    def check(self) -> None:
        given = [name for name in ("layers", "attention", "mlp") if getattr(self, name) is not None]
        if self.remove is not None and given:
            self.refuse(given[0], "and remove both say what to remove; give one of them")
        if self.remove is not None:
            check_remove(self.remove)
        for name in given:
            named = getattr(self, name)
            if not named or min(named) < 0 or len(set(named)) != len(named):
                self.refuse(name, f"must be distinct layer indices (0 or more), got {list(named)}")
        if self.layers is not None:
            for kind in ("attention", "mlp"):
                both = sorted(set(self.layers) & set(getattr(self, kind) or ()))
                if both:
                    self.refuse(kind, f"names layers {both} that layers removes whole; name each layer once")

    @property
    def named(self) -> bool:
        """Whether the cut is named (layers, attention, mlp) rather than chosen from scores."""
        return any(getattr(self, name) is not None for name in ("layers", "attention", "mlp"))

    @overload
    def count(self, num_layers: int) -> int: ...

    @overload
    def count(self, num_layers: None) -> None: ...

    def count(self, num_layers: int | None) -> int | None:
        """How many of ``num_layers`` layers to remove (``None`` while the layer count is not known:
        then only that ``remove`` is given is checked); refused when ``remove`` is not given, or
        ``layers`` names one the model lacks or all of them."""
        if self.named:
            layers, attention, mlp = (set(getattr(self, name) or ()) for name in ("layers", "attention", "mlp"))
            whole = layers | (attention & mlp)  # a layer without either branch goes whole
            for name in ("layers", "attention", "mlp"):
                named = getattr(self, name)
                if named and num_layers is not None and max(named) >= num_layers:
                    self.refuse(name, f"{list(named)} names a layer a {num_layers}-layer model lacks; name indices "
                                      f"below {num_layers}")
            if num_layers is not None and len(whole) >= num_layers:
                self.refuse("layers", f"the cut removes every layer of a {num_layers}-layer model; keep at least one")
            return len(whole) if num_layers is not None else None
        if self.remove is None:
            self.refuse("remove", "is not given; say how many layers to remove: a count (8) or a share (25%)")
        return parse_remove(self.remove, num_layers) if num_layers is not None else None


DEFAULT_SELECT = SelectConfig()
GIVEN = "given layers"
"""The strategy a selection of explicit ``layers`` records."""


def select(report: ScoreReport, remove: int | str | None = DEFAULT_SELECT.remove, strategy: str = DEFAULT_SELECT.strategy,
           metric: str | None = DEFAULT_SELECT.metric, layers: tuple[int, ...] | None = DEFAULT_SELECT.layers,
           attention: tuple[int, ...] | None = DEFAULT_SELECT.attention, mlp: tuple[int, ...] | None = DEFAULT_SELECT.mlp,
           *, rescore: Rescore | None = None) -> Selection:
    """Choose the layers to remove from ``report`` by ``metric`` (default: its only or first metric).

    ``remove`` is a count or a share like ``"25%"`` (or ``layers``, ``attention`` and ``mlp`` name the
    layers and branches: the selection is then those, recorded as :data:`GIVEN`); the keywords are a
    :class:`SelectConfig`'s (``select(report, **dict(config))``). The ``iterative`` strategy
    re-scores the smaller models through ``rescore`` (build it with
    :func:`layerprune.scoring.rescorer` from the model and data the report was scored on).
    ``report.to_json(selection)`` writes both.
    """
    config = SelectConfig(remove=remove, strategy=strategy, metric=metric, layers=layers, attention=attention, mlp=mlp)
    chosen = STRATEGIES.get(config.strategy)
    name = scored_metric(config.metric, list(report.results))
    count = config.count(report.num_layers)
    if config.named:
        units = [unit_name(kind, index) for index in range(report.num_layers) for kind in (ATTENTION, MLP)
                 if index in (getattr(config, kind) or ())]
        return Selection(name, GIVEN, sorted(config.layers or ()), [], units)
    if chosen.rescores and rescore is None:
        raise UsageError(f"the {strategy} strategy re-scores the pruned model; pass rescore="
                         "layerprune.scoring.rescorer(model, calibration), or choose another strategy")
    if report.units:
        return select_branches(report, config, name, rescore)
    removed, steps = chosen.choose(report.results[name], count, rescore)
    return Selection(name, strategy, removed, steps)


def parameter_budget(remove: int | str, num_layers: int, parameters: dict[str, int]) -> int:
    """Decoder parameters to remove at sub-layer granularity: a share (``25%``) of the branches'
    parameters, or ``N`` layers' worth (N / layers of them); for whole layers that is the same cut."""
    value, percent = check_remove(remove)
    share = value / 100 if percent else value / num_layers
    if share >= 1:
        raise OptionError.about("remove", f"{remove} is every layer's worth of a {num_layers}-layer model; keep some")
    return round(share * sum(parameters.values()))


def fitting(importance: dict[str, float], parameters: dict[str, int], removed: list[str], budget: int) -> str | None:
    """The least important branch not yet ``removed`` whose parameters bring the removed total nearer
    ``budget`` than without it (over by less than half of it), None when none does; at least one
    branch stays."""
    spent = sum(parameters[unit] for unit in removed)
    left = [unit for unit in importance if unit not in removed]
    for unit in sorted(left, key=lambda u: (importance[u], list(importance).index(u))):
        if len(left) > 1 and spent + parameters[unit] / 2 < budget:
            return unit
    return None


def select_branches(report: ScoreReport, config: SelectConfig, name: str, rescore: Rescore | None) -> Selection:
    """Branches to remove until their parameters make :func:`parameter_budget`: the least important
    that fit (``independent``), or one at a time re-scoring the rest after each (``iterative``; a
    rescore of removed branches takes their unit names)."""
    assert report.units is not None and report.unit_parameters is not None
    iterative = STRATEGIES.get(config.strategy).rescores
    if not STRATEGIES.get(config.strategy).branches:
        able = [name for name, strategy in STRATEGIES.registered() if strategy.branches]
        raise OptionError.about("strategy", f"{config.strategy} picks runs of whole layers; at sub-layer granularity "
                                            f"use {' or '.join(able)}")
    parameters = report.unit_parameters
    budget = parameter_budget(config.remove, report.num_layers, parameters)
    result = report.results[name]
    removed: list[str] = []
    steps: list[dict[str, Any]] = []
    while True:
        if steps and iterative:
            result = rescore(name, list(removed))  # type: ignore[misc]  (select() refuses a missing rescore)
        importance = dict(zip(result.units or [], result.importance, strict=True))
        unit = fitting(importance, parameters, removed, budget)
        if unit is None:
            break
        if iterative:
            steps.append({"units": list(importance), "importance": result.importance, "removed": unit})
        removed.append(unit)
    if not removed:
        raise OptionError.about("remove", f"{config.remove} is less than half of the smallest branch; ask for more")
    order = {unit: position for position, unit in enumerate(report.units)}
    return Selection(name, config.strategy, [], steps, sorted(removed, key=order.__getitem__))



import_package_modules(__name__, __path__)  # a strategy in its own module registers itself by existing
