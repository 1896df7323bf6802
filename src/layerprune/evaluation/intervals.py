"""Error bars: how far a measured accuracy, perplexity or retained performance could be from the truth.

A few hundred examples leave accuracy uncertain by several points, so two pruning methods can only
be ranked when their difference exceeds the noise. Accuracy gets its standard error; retained
performance (RP, the papers' summary: pruned accuracy over the reference's, averaged over tasks)
and perplexity get percentile-bootstrap 95% intervals. RP's bootstrap is *paired*: each resample
draws the same examples for the reference and the pruned model, because both answered the same
questions, and their errors on a hard example go together (an unpaired interval would be too wide).
Every bootstrap has a fixed seed, so the same predictions always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from layerprune.errors import UsageError

BOOTSTRAP_ITERATIONS = 1000
BOOTSTRAP_SEED = 0


def stderr_of_mean(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's ``mean_stderr``);
    for 0/1 correctness it is sqrt(acc (1 - acc) / (n - 1)). NaN with fewer than two values."""
    if len(values) < 2:
        return math.nan
    return float(np.std(np.asarray(values, dtype=float), ddof=1) / math.sqrt(len(values)))


# Student's t 97.5% quantiles by degrees of freedom (1-30); past 30 the normal's 1.96 is within 4%.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> list[float]:
    """The 95% t-interval of the mean of ``values`` (a few repeated timings: too few for a
    bootstrap, whose percentiles of a handful of values are too narrow). Needs two values."""
    if len(values) < 2:
        raise ValueError("an interval needs at least two values")
    mean = float(np.mean(values))
    quantile = _T_975[len(values) - 2] if len(values) - 1 <= len(_T_975) else 1.96
    half = quantile * stderr_of_mean(values)
    return [mean - half, mean + half]


def _percentile_interval(samples: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _usable_tasks(reference: Mapping[str, Sequence[int]], *others: Mapping[str, Sequence[int]]) -> tuple[list, list]:
    """The tasks every model answered, checked for equal lengths; then those of them with a ratio
    (the reference gets at least one right). Returns ``(shared, usable)``."""
    shared = [task for task in reference if all(task in other for other in others)]
    for task in shared:
        for other in others:
            if len(reference[task]) != len(other[task]):
                raise UsageError(f"cannot compare {task}: {len(reference[task])} vs {len(other[task])} examples; "
                                 "evaluate both models with the same limit")
    usable = [task for task in shared if len(reference[task]) and sum(reference[task]) > 0]
    if not usable:
        raise UsageError("no task to compute retained performance on: the models share no task the reference "
                         "answers at least once correctly; evaluate both on the same tasks")
    return shared, usable


def _bootstrap_retained(reference: Mapping[str, Sequence[int]], candidates: Sequence[Mapping[str, Sequence[int]]],
                        tasks: list[str], iterations: int, seed: int,
                        chance: Mapping[str, float] | None = None) -> np.ndarray:
    """RP of each candidate in each paired resample: shape ``(len(candidates), iterations)``. Every
    task is resampled on its own, with the same example indices for the reference and every
    candidate (they answered the same questions). With ``chance``, each ratio is of the accuracy
    above the task's chance rate; a resample where the reference is not above it has no ratio (NaN)."""
    rng = np.random.default_rng(seed)
    resampled = np.zeros((len(candidates), iterations))
    for task in tasks:
        floor = (chance or {}).get(task, 0.0)
        ref = np.asarray(reference[task], dtype=float)
        draws = rng.integers(0, len(ref), size=(iterations, len(ref)))
        ref_acc = ref[draws].mean(axis=1)
        for row, candidate in enumerate(candidates):
            cand = np.asarray(candidate[task], dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                resampled[row] += np.where(ref_acc > floor, (cand[draws].mean(axis=1) - floor) / (ref_acc - floor),
                                           np.nan)
    return resampled / len(tasks)


def _task_ratios(reference: Mapping[str, Sequence[int]], candidate: Mapping[str, Sequence[int]],
                 tasks: list[str], chance: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each task's accuracy ratio, above the task's ``chance`` rate where one is given."""
    floors = chance or {}
    return {task: float((np.mean(candidate[task]) - floors.get(task, 0.0))
                        / (np.mean(reference[task]) - floors.get(task, 0.0))) for task in tasks}


def retained_performance(reference: Mapping[str, Sequence[int]], candidate: Mapping[str, Sequence[int]], *,
                         iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> dict:
    """RP of ``candidate`` against ``reference`` from their per-example correctness (0/1) per task.

    Returns ``{"mean", "ci95": [low, high], "tasks": {task: acc / reference acc}}``: ``mean`` is the
    mean over tasks of the accuracy ratio, ``ci95`` a paired percentile bootstrap over examples
    (each task resampled on its own, the same indices for both models). Tasks the reference gets
    all wrong have no ratio and are left out (named in ``excluded``).
    """
    shared, usable = _usable_tasks(reference, candidate)
    ratios = _task_ratios(reference, candidate, usable)
    resampled = _bootstrap_retained(reference, [candidate], usable, iterations, seed)[0]
    result = {"mean": float(np.mean(list(ratios.values()))), "ci95": _percentile_interval(resampled), "tasks": ratios}
    excluded = [task for task in shared if task not in usable]
    if excluded:
        result["excluded"] = excluded
    return result


def informative(reference: Sequence[int], chance: float) -> bool:
    """Whether the reference's accuracy on a task stands clear of chance: the low end of its 95%
    interval (acc - 1.96 standard errors) above ``chance``. A task where it does not (SmolLM2-135M's
    3-way next-sentence task at 0.38 against 0.33) leaves no headroom for a pruned model to lose,
    so a ratio over it measures noise."""
    low = float(np.mean(reference)) - 1.96 * stderr_of_mean(reference) if len(reference) else math.nan
    return low > chance  # NaN (fewer than two examples) is not informative


def retained_above_chance(reference: Mapping[str, Sequence[int]], candidate: Mapping[str, Sequence[int]],
                          chance: Mapping[str, float], *, iterations: int = BOOTSTRAP_ITERATIONS,
                          seed: int = BOOTSTRAP_SEED) -> dict:
    """Headroom-aware RP: the mean over informative tasks of (acc - chance) / (reference - chance).

    Plain RP credits a model that answers at random with chance / reference (0.4-0.5 on a task the
    reference barely passes); above chance, a random model keeps 0 and the original 1. Only tasks
    with a chance rate count; those whose reference is within its own 95% interval of chance are
    named in ``uninformative`` and left out. Returns ``{"mean", "ci95", "tasks", "uninformative"}``
    (``mean`` and ``ci95`` ``None`` when no task is informative), the interval a paired bootstrap
    over examples as :func:`retained_performance`'s.
    """
    shared, _ = _usable_tasks(reference, candidate)
    rated = [task for task in shared if task in chance]
    usable = [task for task in rated if informative(reference[task], chance[task])]
    result: dict = {"mean": None, "ci95": None, "tasks": {},
                    "uninformative": [task for task in rated if task not in usable]}
    if usable:
        result["tasks"] = {task: float((np.mean(candidate[task]) - chance[task]) / (np.mean(reference[task])
                                                                                  - chance[task])) for task in usable}
        resampled = _bootstrap_retained(reference, [candidate], usable, iterations, seed, chance)[0]
        result.update(mean=float(np.mean(list(result["tasks"].values()))), ci95=_percentile_interval(resampled))
    return result


def retained_difference(reference: Mapping[str, Sequence[int]], candidate: Mapping[str, Sequence[int]],
                        baseline: Mapping[str, Sequence[int]], *, chance: Mapping[str, float] | None = None,
                        iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> dict:
    """How much more RP ``candidate`` keeps than ``baseline`` (both against ``reference``), with a
    paired 95% interval: ``{"mean", "ci95"}``.

    Two RP intervals that overlap do not show that two methods are alike: both models answered the
    same examples, so their errors go together, and the interval of the *difference*, resampling
    the same examples for all three models, is narrower than two independent intervals would make
    it. An interval that excludes 0 is a difference this evaluation can see.

    With ``chance``, the difference of :func:`retained_above_chance` (over the tasks it keeps: those
    with a chance rate whose reference is informative); ``{"mean": None, "ci95": None}`` when no
    task is.
    """
    shared, usable = _usable_tasks(reference, candidate, baseline)
    if chance is not None:
        usable = [task for task in shared if task in chance and informative(reference[task], chance[task])]
        if not usable:
            return {"mean": None, "ci95": None}
    floors = chance or {}
    gained = _bootstrap_retained(reference, [candidate, baseline], usable, iterations, seed, chance)
    point = np.mean(list(_task_ratios(reference, candidate, usable, floors).values())) \
        - np.mean(list(_task_ratios(reference, baseline, usable, floors).values()))
    return {"mean": float(point), "ci95": _percentile_interval(gained[0] - gained[1])}


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int], *,
                        iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95% percentile-bootstrap interval of perplexity, resampling whole windows.

    ``window_nll`` is each window's summed NLL and ``window_tokens`` its predicted tokens; a
    resample's perplexity is exp(total NLL / total tokens), as for the measured value. Windows, not
    tokens, are resampled: neighbouring tokens are not independent. One window gives no interval
    (both ends are its perplexity).
    """
    return _percentile_interval(np.exp(_resampled_ratios(window_nll, window_tokens, iterations, seed)))


def ratio_interval(window_sums: Sequence[float], window_tokens: Sequence[int], *,
                   iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95% percentile-bootstrap interval of a per-token mean (total / tokens), resampling whole
    windows: the interval of a mean KL or agreement rate measured on perplexity's windows, which,
    like perplexity's, must not treat a window's neighbouring tokens as independent draws."""
    return _percentile_interval(_resampled_ratios(window_sums, window_tokens, iterations, seed))


def _resampled_ratios(window_sums: Sequence[float], window_tokens: Sequence[int], iterations: int,
                      seed: int) -> np.ndarray:
    """Sum over resampled windows of ``window_sums`` / sum of their tokens, one per resample."""
    sums, tokens = np.asarray(window_sums, dtype=float), np.asarray(window_tokens, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(iterations, len(sums)))
    return sums[draws].sum(axis=1) / tokens[draws].sum(axis=1)
