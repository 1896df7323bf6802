"""Error bars: standard errors, the paired bootstrap of retained performance and the perplexity
interval cover known values at about the stated 95%, and RP equals a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerprune.errors import UsageError
from layerprune.evaluation.intervals import (
    informative,
    perplexity_interval,
    retained_above_chance,
    retained_difference,
    retained_performance,
    stderr_of_mean,
)
from layerprune.reporting.eval_tables import comparison_table, metric_intervals

TRIALS = 200


def test_retained_performance_equals_a_hand_computation() -> None:
    reference = {"a": [1, 1, 0, 0], "b": [1, 1, 1, 0]}  # acc 0.5 and 0.75
    candidate = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0]}  # acc 0.25 and 0.5
    result = retained_performance(reference, candidate)
    assert result["tasks"] == {"a": 0.5, "b": pytest.approx(2 / 3)}
    assert result["mean"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["ci95"][0] < result["mean"] < result["ci95"][1]
    assert retained_performance(reference, reference) == {"mean": 1.0, "ci95": [1.0, 1.0],
                                                          "tasks": {"a": 1.0, "b": 1.0}}


def test_retained_performance_leaves_out_tasks_the_reference_never_gets_right() -> None:
    result = retained_performance({"a": [1, 0], "z": [0, 0]}, {"a": [1, 1], "z": [1, 0]})
    assert result["tasks"] == {"a": 2.0} and result["excluded"] == ["z"]
    with pytest.raises(UsageError, match="same limit"):
        retained_performance({"a": [1, 0]}, {"a": [1]})
    with pytest.raises(UsageError, match="no task"):
        retained_performance({"z": [0, 0]}, {"z": [1, 1]})


def test_paired_bootstrap_covers_the_true_retained_performance_at_about_95_percent() -> None:
    """Two tasks whose true accuracy ratios are 0.8 and 0.9 (true RP 0.85); the pruned model keeps
    a random share of the reference's right answers, so the two models' errors are paired."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(TRIALS):
        reference, candidate = {}, {}
        for task, (accuracy, kept) in {"a": (0.7, 0.8), "b": (0.5, 0.9)}.items():
            right = rng.random(300) < accuracy
            reference[task], candidate[task] = right.astype(int), (right & (rng.random(300) < kept)).astype(int)
        low, high = retained_performance(reference, candidate, iterations=500, seed=trial)["ci95"]
        covered += low <= 0.85 <= high
    assert 0.90 <= covered / TRIALS <= 0.99


def test_retained_difference_is_the_difference_of_the_two_rps_and_covers_the_true_gap() -> None:
    """Two pruned models of one reference: ``better`` keeps 90% and 95% of the right answers of two
    tasks, ``worse`` a subset of those (80% and 85% overall: a true RP gap of 0.10). The paired
    interval of the difference covers the gap at about 95%, and it is narrower than two
    independent intervals would make it: the two models' errors go together."""
    reference = {"a": [1, 1, 0, 0], "b": [1, 1, 1, 0]}
    one, other = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0]}, {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0]}
    expected = retained_performance(reference, one)["mean"] - retained_performance(reference, other)["mean"]
    assert retained_difference(reference, one, other)["mean"] == pytest.approx(expected)
    assert retained_difference(reference, one, one) == {"mean": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(UsageError, match="same limit"):
        retained_difference(reference, one, {"a": [1], "b": [1, 0, 0, 0]})

    rng = np.random.default_rng(2)
    covered, narrower = 0, 0
    for trial in range(TRIALS):
        reference, better, worse = {}, {}, {}
        for task, (kept, dropped) in {"a": (0.9, 0.8 / 0.9), "b": (0.95, 0.85 / 0.95)}.items():
            right = rng.random(300) < 0.6
            better[task] = right & (rng.random(300) < kept)
            worse[task] = (better[task] & (rng.random(300) < dropped)).astype(int)
            reference[task], better[task] = right.astype(int), better[task].astype(int)
        low, high = retained_difference(reference, better, worse, iterations=500, seed=trial)["ci95"]
        covered += low <= 0.10 <= high
        widths = [np.subtract(*retained_performance(reference, model, iterations=500, seed=trial)["ci95"][::-1])
                  for model in (better, worse)]
        narrower += (high - low) < math.hypot(*widths)  # what two independent intervals would give
    assert 0.90 <= covered / TRIALS <= 0.99
    assert narrower >= 0.95 * TRIALS


def test_paired_interval_is_narrower_than_the_spread_of_unpaired_accuracies() -> None:
    """A model that differs from the reference on few examples gets a tight RP interval, though each
    accuracy alone is uncertain by several points: the pairing is what makes methods rankable."""
    rng = np.random.default_rng(0)
    right = (rng.random(400) < 0.6).astype(int)
    flipped = right.copy()
    flipped[np.flatnonzero(right)[:8]] = 0  # 8 of the ~240 right answers lost
    low, high = retained_performance({"t": right}, {"t": flipped})["ci95"]
    accuracy_width = 2 * 1.96 * stderr_of_mean(right) / right.mean()
    assert high - low < accuracy_width / 3


def test_standard_error_interval_covers_the_true_accuracy_at_about_95_percent() -> None:
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(TRIALS):
        right = (rng.random(200) < 0.3).astype(int)
        margin = 1.96 * stderr_of_mean(right)
        covered += right.mean() - margin <= 0.3 <= right.mean() + margin
    assert 0.90 <= covered / TRIALS <= 0.99
    assert stderr_of_mean([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert math.isnan(stderr_of_mean([1]))


def test_perplexity_interval_covers_the_true_perplexity_at_about_95_percent() -> None:
    """Windows of 100 tokens with a mean NLL drawn around 3 nats: the true perplexity is e^3."""
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(TRIALS):
        window_nll = 100 * rng.normal(3.0, 0.3, size=60)
        low, high = perplexity_interval(window_nll, [100] * 60, iterations=500, seed=trial)
        covered += low <= math.exp(3.0) <= high
    assert 0.90 <= covered / TRIALS <= 0.99
    assert perplexity_interval([200.0], [100]) == pytest.approx([math.exp(2.0)] * 2)


def test_table_shows_intervals_and_retained_performance() -> None:
    model = {"perplexity": {"wiki": {"ppl": 30.0, "nll": 3.4, "tokens": 9, "ci95": [28.0, 32.5]}},
             "tasks": {"t": {"acc": 0.5, "stderr": 0.05, "available": 500, "evaluated": 100}}}
    pruned = {**model, "retained": {"mean": 0.9, "ci95": [0.85, 0.95], "tasks": {"t": 0.9}}}
    report = {"reference": "dense", "models": {"dense": model, "pruned": pruned}}
    assert metric_intervals(model)["t acc"] == pytest.approx((0.5 - 0.098, 0.5 + 0.098))
    table = comparison_table(report)
    assert "| ppl wiki | 30 (28–32.5) |" in table
    assert "| t acc | 0.5 (0.402–0.598) |" in table
    assert "| retained | — | 0.9 (0.85–0.95) | — |" in table


def test_retained_above_chance_equals_a_hand_computation_and_leaves_out_tasks_near_chance() -> None:
    """Task a (chance 0.25): reference 0.75, candidate 0.5 -> (0.5 - 0.25) / (0.75 - 0.25) = 0.5. Task b
    (chance 0.5): the reference's 0.55 on 20 examples is within its own interval of 0.5: left out."""
    reference = {"a": [1] * 30 + [0] * 10, "b": [1] * 11 + [0] * 9}
    candidate = {"a": [1] * 20 + [0] * 20, "b": [0] * 20}
    result = retained_above_chance(reference, candidate, {"a": 0.25, "b": 0.5})
    assert result["tasks"] == {"a": pytest.approx(0.5)} and result["mean"] == pytest.approx(0.5)
    assert result["uninformative"] == ["b"]
    assert result["ci95"][0] < 0.5 < result["ci95"][1]
    assert informative(reference["a"], 0.25) and not informative(reference["b"], 0.5)
    # plain RP would credit task b's all-wrong candidate with 0 and a random one with about 0.9
    itself = retained_above_chance(reference, reference, {"a": 0.25})
    assert itself["mean"] == 1.0 and itself["ci95"] == [1.0, 1.0] and itself["uninformative"] == []
    nothing = retained_above_chance(reference, candidate, {"b": 0.5})
    assert nothing["mean"] is None and nothing["ci95"] is None and nothing["uninformative"] == ["b"]


def test_retained_difference_above_chance_is_the_difference_of_the_two_headroom_rps() -> None:
    """With chance rates, the paired difference is that of retained_above_chance, over the tasks it
    keeps (task b, whose reference is within its interval of chance, is left out of both)."""
    reference = {"a": [1] * 30 + [0] * 10, "b": [1] * 11 + [0] * 9}
    one = {"a": [1] * 20 + [0] * 20, "b": [0] * 20}
    other = {"a": [1] * 15 + [0] * 25, "b": [1] * 20}
    chance = {"a": 0.25, "b": 0.5}
    expected = (retained_above_chance(reference, one, chance)["mean"]
                - retained_above_chance(reference, other, chance)["mean"])
    assert expected == pytest.approx((0.5 - 0.25) / 0.5 - (0.375 - 0.25) / 0.5)
    difference = retained_difference(reference, one, other, chance=chance)
    assert difference["mean"] == pytest.approx(expected)
    assert difference["ci95"][0] < expected < difference["ci95"][1]
    assert retained_difference(reference, one, one, chance=chance) == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert retained_difference(reference, one, other, chance={"b": 0.5}) == {"mean": None, "ci95": None}


def test_retained_above_chance_covers_the_true_value_at_about_95_percent() -> None:
    """Three-way tasks (chance 1/3): the reference is right on 0.7, the candidate keeps each right
    answer with probability 0.8 and guesses the rest at chance, so its accuracy is 0.56 + 0.44 / 3
    and its true RP above chance (0.56 + 0.44 / 3 - 1/3) / (0.7 - 1/3)."""
    rng = np.random.default_rng(4)
    truth = (0.56 + 0.44 / 3 - 1 / 3) / (0.7 - 1 / 3)
    covered = 0
    for trial in range(TRIALS):
        right = rng.random(400) < 0.7
        kept = right & (rng.random(400) < 0.8)
        guessed = ~kept & (rng.random(400) < 1 / 3)
        result = retained_above_chance({"a": right.astype(int)}, {"a": (kept | guessed).astype(int)},
                                       {"a": 1 / 3}, iterations=500, seed=trial)
        covered += result["ci95"][0] <= truth <= result["ci95"][1]
    assert 0.90 <= covered / TRIALS <= 0.99
