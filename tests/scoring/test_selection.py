"""Turning scores into layers to remove: counts, strategies, and iterative re-scoring."""

from __future__ import annotations

import pytest

from layerprune.errors import UsageError
from layerprune.models.surgery import remove_layers
from layerprune.scoring import MetricResult, rescorer, score
from layerprune.selection import least_important, least_important_run, parse_remove, select
from tests.helpers import tiny_loaded
from tests.scoring.references import rows_with_padding


@pytest.mark.parametrize(("remove", "layers", "expected"), [
    ("8", 32, 8), (3, 30, 3), ("25%", 32, 8), ("25%", 30, 8), ("37%", 30, 11), ("12%", 30, 4),
    ("50 %", 6, 3), ("12.5%", 16, 2), ("25%", 18, 5),
])
def test_remove_counts_and_shares(remove: str | int, layers: int, expected: int) -> None:
    assert parse_remove(remove, layers) == expected


@pytest.mark.parametrize(("remove", "message"), [
    ("0", "more than 0"), ("6", "remove all 6"), ("5%", "removes no layer"), ("95%", "remove all 6"), ("2.5", "cannot be read"),
    ("a quarter", "cannot be read"), ("100%", "less than all"), ("-1", "cannot be read"),
])
def test_bad_remove_values_say_how_to_fix_them(remove: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_remove(remove, 6)


def test_independent_takes_the_lowest_and_consecutive_the_best_run() -> None:
    importance = [5.0, 1.0, 9.0, 2.0, 3.0, 8.0]
    assert least_important(importance, 2) == [1, 3]
    per_layer = MetricResult("x", importance, importance, "")
    # windows of 2: 6, 10, 11, 5, 11 -> the run starting at 3
    assert least_important_run(per_layer, 2) == [3, 4]
    table = {1: importance, 2: [0.4, 0.1, 0.3, 0.2, 0.5], 3: [0.9, 0.8, 0.7, 0.95]}
    blocks = MetricResult("angular", importance, table, "", blocks=table)
    assert least_important_run(blocks, 2) == [1, 2]
    assert least_important_run(blocks, 3) == [2, 3, 4]


def test_consecutive_angular_picks_the_start_with_the_smallest_distance_brute_force() -> None:
    loaded = tiny_loaded("llama")
    report = score(loaded, rows_with_padding(), ["angular", "block-cosine"])
    for n in (1, 2, 3):
        distances = report.results["angular"].values[n]
        best = min(range(len(distances)), key=distances.__getitem__)
        assert select(report, n, "consecutive", "angular").remove == list(range(best, best + n))
        cosines = report.results["block-cosine"].values[n]
        best = max(range(len(cosines)), key=cosines.__getitem__)
        assert select(report, n, "consecutive", "block-cosine").remove == list(range(best, best + n))


@pytest.mark.parametrize("metric", ["bi", "ppl", "magnitude-l2"])
def test_iterative_equals_removing_and_rescoring_by_hand(metric: str) -> None:
    loaded = tiny_loaded("gemma3")
    calibration = rows_with_padding()
    report = score(loaded, calibration, [metric])
    selection = select(report, 3, "iterative", rescore=rescorer(loaded, calibration))
    working, remaining, expected = loaded.copy(share_weights=True), list(range(loaded.num_layers)), []
    for _ in range(3):
        importance = score(working, calibration, [metric]).results[metric].importance
        victim = min(range(len(importance)), key=importance.__getitem__)
        expected.append(remaining.pop(victim))
        remove_layers(working.model, [victim])
    assert selection.remove == sorted(expected)
    assert [step["removed"] for step in selection.steps] == expected
    assert loaded.num_layers == 6, "the scored model itself must stay whole"
    assert report.to_json(selection)["selection"]["strategy"] == "iterative"


def test_one_rescorer_scores_each_smaller_model_once_and_a_shared_pass_for_all_its_metrics(monkeypatch) -> None:
    """Iterative bi and angular through one rescorer: every re-scoring pass of the similarity
    metrics serves both, and the selections equal those of separate rescorers."""
    import layerprune.scoring.similarity as similarity

    loaded, calibration = tiny_loaded("llama"), rows_with_padding()
    report = score(loaded, calibration, ["bi", "angular"])
    alone = {metric: select(report, 3, "iterative", metric, rescore=rescorer(loaded, calibration))
             for metric in ("bi", "angular")}
    passes = []
    original_pass = similarity.similarity_pass
    monkeypatch.setattr(similarity, "similarity_pass", lambda *a, **k: passes.append(1) or original_pass(*a, **k))
    shared = rescorer(loaded, calibration)
    together = {metric: select(report, 3, "iterative", metric, rescore=shared) for metric in ("bi", "angular")}
    assert together == alone
    removed_sets = {tuple(sorted(s["removed"] for s in selection.steps[:step]))
                    for selection in together.values() for step in (1, 2)}
    assert len(passes) == len(removed_sets)  # one pass per distinct smaller model, not per metric


def test_selecting_an_unscored_metric_is_refused() -> None:
    report = score(tiny_loaded("llama"), None, ["magnitude-l1"])
    with pytest.raises(UsageError, match="was not scored"):
        select(report, 2, metric="bi")
    with pytest.raises(UsageError, match="unknown strategy"):
        select(report, 2, "greedy")


def test_selection_leaves_the_plain_report_alone_and_iterative_needs_a_rescore_function() -> None:
    report = score(tiny_loaded("llama"), None, ["magnitude-l1"])
    before = report.to_json()
    chosen = select(report, 2, "independent")
    assert report.to_json() == before and "selection" not in before
    importance = report.results["magnitude-l1"].importance
    expected = sorted(sorted(range(len(importance)), key=importance.__getitem__)[:2])
    assert report.to_json(chosen)["selection"] == {"metric": "magnitude-l1", "strategy": "independent",
                                                   "remove": expected}
    with pytest.raises(UsageError, match="pass rescore="):
        select(report, 2, "iterative")
