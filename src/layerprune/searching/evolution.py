"""Evolutionary search over the removed set itself ((1+lambda), after EvoPress), made cheap enough for a CPU.

A *unit* is an opaque hashable (a layer's index, or at sub-layer granularity a branch ``attn.i`` /
``mlp.i``), a cut is the frozenset of units it removes, and the budget (:class:`UnitBudget`) is a
parameter count that every cut must remove within a tolerance: every mutation is checked against it.

The loop (:func:`evolve`): the parent is the best of the initial population (every heuristic
selection, so evolution can only improve on them in fitness, plus random cuts); each generation
makes ``offspring`` children by swapping up to three removed units for kept ones, and the best
child replaces the parent when it is better on every fitness batch together. What keeps it cheap:

- **cached prefixes**: a candidate's forward starts at its first removed unit
  (:class:`~layerprune.searching.fitness.CachedOriginal`);
- **multi-stage selection**: every child is scored on the first batches only (stage 1), the best
  ``SURVIVORS`` on all of them (stage 2);
- **exact early stopping**: per-batch fitness sums never fall, so a child whose partial sum already
  exceeds the stage-1 total of ``SURVIVORS`` rivals (the parent among them) cannot survive stage 1,
  and a survivor whose partial sum exceeds the parent's total cannot replace it: both stop there,
  and the outcome is what scoring them in full would give;
- **nothing scored twice**: the per-batch sums are kept per removed set, a set proposed again
  continues from where it stopped.

Each generation's best fitness and its work (evaluations, tokens forwarded, layer evaluations run
against a full forward of every contender) are kept in :class:`Generation` (``search.json``'s trace).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from layerprune.data import CalibrationSet
from layerprune.models.loading import LoadedModel
from layerprune.progress import Progress
from layerprune.searching.budget import TimeBudget
from layerprune.searching.candidates import EVOLVED, Candidate, unit_candidate
from layerprune.searching.config import SearchConfig
from layerprune.searching.fitness import TOP_K, BatchScore, CachedOriginal

Cut = frozenset[Hashable]
MAX_SWAPS = 3
"""A child swaps 1 to this many removed units for kept ones (EvoPress's ``evo_drop_search``)."""
SURVIVORS = 2
"""Children scored on every fitness batch after stage 1."""
STAGE_ONE_SHARE = 4
"""Stage 1 scores this fraction of the fitness batches (one in four, at least one)."""
MUTATION_TRIES = 100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitBudget:
    """The parameters of each unit, and how many a cut must remove: ``target`` within ``tolerance``.
    A cut must also keep at least one unit."""

    sizes: Mapping[Hashable, int]
    target: int
    tolerance: int = 0

    def removed_parameters(self, cut: Cut) -> int:
        return sum(self.sizes[unit] for unit in cut)

    def fits(self, cut: Cut) -> bool:
        return 0 < len(cut) < len(self.sizes) and abs(self.removed_parameters(cut) - self.target) <= self.tolerance

    def mutate(self, parent: Cut, rng: random.Random) -> Cut | None:
        """A child of ``parent``: 1 to :data:`MAX_SWAPS` removed units swapped for kept ones, drawn
        until one fits the budget (``None`` when none of :data:`MUTATION_TRIES` draws does)."""
        removed = [unit for unit in self.sizes if unit in parent]  # the declaration order: reproducible
        kept = [unit for unit in self.sizes if unit not in parent]
        for _ in range(MUTATION_TRIES):
            swaps = rng.randint(1, min(MAX_SWAPS, len(removed), len(kept)))
            child = (parent - set(rng.sample(removed, swaps))) | set(rng.sample(kept, swaps))
            if child != parent and self.fits(child):
                return frozenset(child)
        return None

    def random_cut(self, rng: random.Random) -> Cut | None:
        """Units in random order, each taken while it does not overshoot ``target + tolerance``, until
        the cut removes at least ``target - tolerance`` parameters; the cut if it fits, else ``None``."""
        order = list(self.sizes)
        rng.shuffle(order)
        cut: set[Hashable] = set()
        removed = 0
        for unit in order:
            if removed >= self.target - self.tolerance:
                break
            if removed + self.sizes[unit] <= self.target + self.tolerance:
                cut.add(unit)
                removed += self.sizes[unit]
        return frozenset(cut) if self.fits(frozenset(cut)) else None


def layer_budget(layer_parameters: list[int], count: int) -> UnitBudget:
    """Whole layers: unit ``i`` is layer ``i``; the target is ``count`` layers of the mean size, with
    the slack any ``count`` layers need when their sizes differ (none when they are equal)."""
    mean = sum(layer_parameters) / len(layer_parameters)
    spread = (max(layer_parameters) - min(layer_parameters)) * count
    return UnitBudget(dict(enumerate(layer_parameters)), round(mean * count), math.ceil(spread / 2) + 1
                      if spread else 0)


def branch_budget(branch_parameters: Mapping[str, int], target: int) -> UnitBudget:
    """Branches: unit ``attn.i`` / ``mlp.i`` with its parameters; every cut removes ``target`` parameters
    within half the largest branch, the slack that keeps every heuristic branch selection
    (:func:`~layerprune.selection.select_branches` stops within half a branch of its budget) and every
    cut of whole layers of the mean size (each layer's two branches) in the population."""
    return UnitBudget(dict(branch_parameters), target, math.ceil(max(branch_parameters.values()) / 2))


@dataclass
class Generation:
    """One generation's (or the initial population's, index 0) best fitness and the work it cost."""

    index: int
    best_fitness: float
    improved: bool
    contenders: int
    evaluations: int
    """Batch evaluations run (a contender on one batch), new ones only."""
    cache_hits: int
    """Contenders already scored in an earlier generation (as far as this one needed)."""
    stopped_early: int
    tokens: int
    """Tokens forwarded (each batch's real tokens once per contender evaluated on it)."""
    layer_tokens: int
    """Layer evaluations of one token actually run."""
    prefix_free_layer_tokens: int
    """What the same evaluations cost if each forward ran every kept layer (no cached prefix)."""
    naive_layer_tokens: int
    """What scoring every contender on every batch with full forwards would cost (no cached prefix, no
    multi-stage selection, no early stop, no cache)."""
    seconds: float
    left_out: int = 0
    """Contenders the time budget left unscored (the initial population's random cuts)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


@dataclass
class Scored:
    """A cut's per-batch fitness sums so far (a prefix of the batches)."""

    batches: list[BatchScore] = field(default_factory=list)

    def total(self, upto: int) -> float:
        return sum(score.total for score in self.batches[:upto])

    def mean(self) -> float:
        return self.total(len(self.batches)) / sum(score.positions for score in self.batches)


@dataclass
class Evolution:
    """An evolutionary run's state over :class:`CachedOriginal`: the cache of scored cuts, the parent,
    the trace. :func:`evolve` drives it."""

    original: CachedOriginal
    budget: UnitBudget
    rng: random.Random
    scored: dict[Cut, Scored] = field(default_factory=dict)
    parent: Cut | None = None
    trace: list[Generation] = field(default_factory=list)
    _work: dict[str, int] = field(default_factory=dict)
    _contenders: list[Cut] = field(default_factory=list)

    @property
    def batch_count(self) -> int:
        return len(self.original.batches)

    @property
    def stage_one(self) -> int:
        return max(1, self.batch_count // STAGE_ONE_SHARE)

    def fitness(self, cut: Cut) -> float:
        """The mean per-position fitness of a cut scored on every batch."""
        assert len(self.scored[cut].batches) == self.batch_count, "only a fully scored cut has a fitness"
        return self.scored[cut].mean()

    def full(self) -> list[tuple[Cut, float]]:
        """Every cut scored on every batch, best first (ties: the order they were first scored)."""
        done = [cut for cut, scored in self.scored.items() if len(scored.batches) == self.batch_count]
        return sorted(((cut, self.fitness(cut)) for cut in done), key=lambda pair: pair[1])

    def extend(self, cut: Cut, upto: int, bar: float) -> bool:
        """Score ``cut`` on batches up to ``upto``, stopping once its partial sum exceeds ``bar``;
        whether it got there (a cut already past ``bar`` on its scored batches stops at once)."""
        scored = self.scored.setdefault(cut, Scored())
        while len(scored.batches) < upto:
            if scored.total(len(scored.batches)) > bar:
                return False
            score = self.original.score(len(scored.batches), cut)
            scored.batches.append(score)
            for key, value in (("evaluations", 1), ("tokens", score.tokens), ("layer_tokens", score.layer_tokens),
                               ("prefix_free_layer_tokens", score.full_layer_tokens)):
                self._work[key] = self._work.get(key, 0) + value
        return scored.total(upto) <= bar

    def compete(self, contenders: list[Cut], stage_one: int,
                affordable: Callable[[int], bool] = lambda scored: True) -> Cut:
        """The best of the parent (if any) and ``contenders`` on every batch, by two-stage selection:
        each contender on the first ``stage_one`` batches, then the best :data:`SURVIVORS` of them on
        all; each stops early as soon as it cannot survive its stage (see the module docstring).

        ``affordable(n)``, asked before each contender once there is a best one and ``n`` are
        scored, can end the stage there: the contenders after it are left out (the time budget)."""
        contenders = [cut for cut in dict.fromkeys(contenders) if cut != self.parent]
        stage: list[tuple[float, Cut]] = []
        if self.parent is not None:
            stage.append((self.scored[self.parent].total(stage_one), self.parent))
        ready = {cut for cut in contenders if len(self.scored.get(cut, Scored()).batches) >= stage_one}
        stopped = 0
        for position, cut in enumerate(contenders):
            if stage and not affordable(position):
                self._work["left_out"] = len(contenders) - position
                contenders = contenders[:position]
                break
            rivals = sorted(total for total, _ in stage)
            bar = rivals[SURVIVORS - 1] if len(rivals) >= SURVIVORS else math.inf
            if self.extend(cut, stage_one, bar):
                stage.append((self.scored[cut].total(stage_one), cut))
            else:
                stopped += len(self.scored[cut].batches) < stage_one  # a cut scored before stopped nothing
        survivors = [cut for _, cut in sorted(stage, key=lambda pair: pair[0])[:SURVIVORS] if cut != self.parent]
        best = self.parent
        for cut in survivors:
            bar = self.scored[best].total(self.batch_count) if best is not None else math.inf
            if self.extend(cut, self.batch_count, bar) and (best is None or self.fitness(cut) < self.fitness(best)):
                best = cut
            elif len(self.scored[cut].batches) < self.batch_count:
                stopped += 1
        assert best is not None, "a competition without a parent has a contender that reaches every batch"
        self._work.update(cache_hits=len(ready.intersection(contenders)), stopped_early=stopped)
        self._contenders = contenders
        return best

    def next_cost(self, offspring: int) -> float:
        """Seconds the next generation is expected to take: the last one's, or after the initial
        population, its seconds per batch evaluation times a generation's most (no early stop)."""
        last = self.trace[-1]
        if last.index > 0:
            return last.seconds
        most = offspring * self.stage_one + SURVIVORS * (self.batch_count - self.stage_one)
        return last.seconds / max(last.evaluations, 1) * most

    def record(self, index: int, best: Cut, seconds: float) -> Generation:
        """Close the generation whose competition chose ``best``: it becomes the parent."""
        naive = sum(batch.tokens for batch in self.original.batches) * sum(
            self.original.layers_run(cut) for cut in self._contenders)
        improved = best != self.parent
        self.parent = best
        work, self._work = self._work, {}
        generation = Generation(index, self.fitness(best), improved, len(self._contenders),
                                work.get("evaluations", 0), work.get("cache_hits", 0), work.get("stopped_early", 0),
                                work.get("tokens", 0), work.get("layer_tokens", 0),
                                work.get("prefix_free_layer_tokens", 0), naive, seconds, work.get("left_out", 0))
        self.trace.append(generation)
        return generation


def initial_population(budget: UnitBudget, known: Iterable[Cut], size: int, rng: random.Random) -> list[Cut]:
    """The known cuts (the heuristic selections, in their order) that fit the budget, then random cuts
    until there are ``size`` in all (or as many distinct ones as the draws give)."""
    population = [cut for cut in dict.fromkeys(known) if budget.fits(cut)]
    for _ in range(10 * size):
        if len(population) >= size:
            break
        cut = budget.random_cut(rng)
        if cut is not None and cut not in population:
            population.append(cut)
    return population


def evolve(original: CachedOriginal, budget: UnitBudget, known: list[Cut], *, generations: int, offspring: int,
           seed: int, clock: Callable[[], float], keep_going: Callable[[float, str], bool],
           on_generation: Callable[[Generation], None] = lambda generation: None) -> Evolution:
    """Run the evolution (see the module docstring) from ``known`` cuts plus random ones (``offspring``
    of them at least), for ``generations`` or until ``keep_going(estimated seconds of the next step,
    what the step is)`` says no, asked before each generation and before each initial cut after the
    first (the initial population is bounded too, the known cuts first); ``seed`` makes it
    reproducible. Returns the state: ``full()`` ranks what was scored."""
    run = Evolution(original, budget, random.Random(seed))
    started = clock()
    population = initial_population(budget, known, len(known) + offspring, run.rng)

    def affordable(scored: int) -> bool:  # the next contender costs about what the scored ones did
        return keep_going((clock() - started) / scored, f"{len(population) - scored} of the initial population's "
                                                        f"{len(population)} cuts")

    run.record(0, run.compete(population, run.batch_count, affordable), clock() - started)
    on_generation(run.trace[-1])
    for index in range(1, generations + 1):
        if not keep_going(run.next_cost(offspring), f"evolution generations {index}..{generations}"):
            break
        started = clock()
        assert run.parent is not None
        children = [child for child in (budget.mutate(run.parent, run.rng) for _ in range(offspring)) if child]
        run.record(index, run.compete(children, run.stage_one), clock() - started)
        on_generation(run.trace[-1])
    return run


def fitness_rows(rows: CalibrationSet, count: int) -> CalibrationSet:
    """The first ``count`` calibration rows: what the fitness reads (its cache holds a hidden state per
    layer boundary for each of their tokens)."""
    return CalibrationSet(rows.input_ids[:count], rows.attention_mask[:count], rows.info)


def evolved_candidates(loaded: LoadedModel, rows: CalibrationSet, heuristic: list[Candidate],
                       unit_budget: UnitBudget, config: SearchConfig, budget: TimeBudget,
                       reserve: Callable[[int], float], progress: bool | None) -> tuple[list[Candidate], dict[str, Any]]:
    """The ``config.finalists`` best cuts of an evolution over ``unit_budget``'s units (layers, or at
    sub-layer granularity branches) seeded with the ``heuristic`` candidates (each labelled by the
    heuristic that chose it, or as evolved), and ``search.json``'s ``evolution`` part. Over branches, a
    whole-layer cut is seeded as both branches of each of its layers.

    Generations run while the time budget covers the next one and ``reserve(finalists)``, the
    estimated seconds of ranking the finalists afterwards (a loaded machine gets fewer generations).
    """
    branches = config.granularity != "layer"
    original = CachedOriginal(loaded, fitness_rows(rows, config.fitness_rows), config.batch_size, config.fitness)
    seeds = {(candidate.units() if branches else frozenset(candidate.remove)): candidate for candidate in heuristic}
    bar = Progress("evolution", config.generations, unit="generations", shown=progress is not False)

    def keep_going(next_seconds: float, what: str) -> bool:
        fits = budget.allows(next_seconds + reserve(config.finalists))
        if not fits:
            budget.skip(what, next_seconds, log.warning)
        return fits

    def shown(generation: Generation) -> None:
        run_trace.append(generation)
        bar.note(f"generation {generation.index}, best {config.fitness} {generation.best_fitness:.4f}"
                 + (" (improved)" if generation.improved and generation.index else ""))
        bar.update(generation.index > 0)

    run_trace: list[Generation] = []
    run = evolve(original, unit_budget, list(seeds), generations=config.generations, offspring=config.offspring,
                 seed=config.seed, clock=lambda: budget.elapsed, keep_going=keep_going, on_generation=shown)
    bar.close()
    finalists = []
    for cut, fitness in run.full()[:config.finalists]:
        found = seeds.get(cut)
        finalists.append(replace(found, repair=None, also_found_by=list(found.also_found_by), fitness=fitness)
                         if found is not None else
                         unit_candidate(cut, config.fitness, EVOLVED, "sublayer" if branches else "layer",
                                        fitness=fitness))
    scored = dict(run.full())
    known_fitness = [scored[cut] for cut in seeds if cut in scored]
    generations_run = len(run.trace) - 1
    part = {
        "fitness": config.fitness, "fitness_rows": sum(b.where.shape[0] for b in original.batches),
        "fitness_positions": sum(b.positions for b in original.batches), "fitness_batches": run.batch_count,
        "stage_one_batches": run.stage_one, "survivors": SURVIVORS,
        "top_k": TOP_K if config.fitness == "kl" else None, "units": "branches" if branches else "layers",
        "budget_parameters": unit_budget.target, "budget_tolerance": unit_budget.tolerance,
        "initial_population": run.trace[0].contenders, "heuristic_cuts": len(seeds),
        "best_heuristic_fitness": min(known_fitness) if known_fitness else None,
        "generations_run": generations_run,
        "stopped_by": "its generations" if generations_run == config.generations else "the time budget",
        "trace": [generation.to_json() for generation in run.trace],
    }
    return finalists, part
