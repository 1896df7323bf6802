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


def _percentile_interval(samples: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def retained_performance(reference: Mapping[str, Sequence[int]], candidate: Mapping[str, Sequence[int]], *,
                         iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> dict:
    """RP of ``candidate`` against ``reference`` from their per-example correctness (0/1) per task.

    Returns ``{"mean", "ci95": [low, high], "tasks": {task: acc / reference acc}}``: ``mean`` is the
    mean over tasks of the accuracy ratio, ``ci95`` a paired percentile bootstrap over examples
    (each task resampled on its own, the same indices for both models). Tasks the reference gets
    all wrong have no ratio and are left out (named in ``excluded``).
    """
    shared = [task for task in reference if task in candidate]
    for task in shared:
        if len(reference[task]) != len(candidate[task]):
            raise UsageError(f"cannot compare {task}: {len(reference[task])} vs {len(candidate[task])} examples; "
                             "evaluate both models with the same --limit")
    usable = [task for task in shared if len(reference[task]) and sum(reference[task]) > 0]
    if not usable:
        raise UsageError("no task to compute retained performance on: the models share no task the reference "
                         "answers at least once correctly; evaluate both on the same --tasks")
    rng = np.random.default_rng(seed)
    ratios: dict[str, float] = {}
    resampled = np.zeros(iterations)
    for task in usable:
        ref, cand = np.asarray(reference[task], dtype=float), np.asarray(candidate[task], dtype=float)
        ratios[task] = float(cand.mean() / ref.mean())
        draws = rng.integers(0, len(ref), size=(iterations, len(ref)))
        ref_acc = ref[draws].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            resampled += np.where(ref_acc > 0, cand[draws].mean(axis=1) / ref_acc, np.nan)
    result = {"mean": float(np.mean(list(ratios.values()))),
              "ci95": _percentile_interval(resampled / len(usable)), "tasks": ratios}
    excluded = [task for task in shared if task not in usable]
    if excluded:
        result["excluded"] = excluded
    return result


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int], *,
                        iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95% percentile-bootstrap interval of perplexity, resampling whole windows.

    ``window_nll`` is each window's summed NLL and ``window_tokens`` its predicted tokens; a
    resample's perplexity is exp(total NLL / total tokens), as for the measured value. Windows, not
    tokens, are resampled: neighbouring tokens are not independent. One window gives no interval
    (both ends are its perplexity).
    """
    nll, tokens = np.asarray(window_nll, dtype=float), np.asarray(window_tokens, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(nll), size=(iterations, len(nll)))
    return _percentile_interval(np.exp(nll[draws].sum(axis=1) / tokens[draws].sum(axis=1)))
