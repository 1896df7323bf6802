"""The time budget bounds the whole search, on a tiny model whose decoder layers are slowed.

The budget reads :data:`layerprune.searching.budget.clock`; here a fake clock that only the slowed
layers advance (one second per layer call on a calibration or ranking batch), so the run's cost is
exact and the same on any machine: what is asserted is what the budget let through, not a timing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import layerprune as lp
from layerprune.cli.main import main
from layerprune.data import CalibrationConfig
from layerprune.evaluation.efficiency import Workload
from layerprune.searching import budget as budget_module
from layerprune.searching.candidates import Candidate
from layerprune.searching.search import found_again

QUICK = Workload(prompt_len=8, new_tokens=2, repeats=1, warmup=0)
LAYER_SECONDS = 1.0


@pytest.fixture
def slowed(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock advanced by every decoder layer call on more than one row (the calibration and
    ranking batches; single-row speed timing stays free, so the fake cost does not hang on how many
    turns a noisy timing takes). Returns the seconds one such call costs, ``[LAYER_SECONDS]``, for a
    test to raise (a loaded machine)."""
    now, per_call = [0.0], [LAYER_SECONDS]
    forward = LlamaDecoderLayer.forward

    def slow_forward(self: LlamaDecoderLayer, hidden_states, *args, **kwargs):
        if hidden_states.shape[0] > 1:
            now[0] += per_call[0]
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", slow_forward)
    monkeypatch.setattr(budget_module, "clock", lambda: now[0])
    return per_call


def calibration(corpus: dict[str, Path]) -> CalibrationConfig:
    return CalibrationConfig(source=str(corpus["calibration"]), samples=8, seq_len=64)


def test_costly_metrics_and_candidates_stop_where_the_budget_ends(corpus, slowed, caplog) -> None:
    """One calibration pass is 2 batches x 6 layers = 12 s, and so is the original's ranking. Of the 120 s,
    108 are left after that ranking, half of them kept for ranking the candidates: ``taylor`` (3
    passes and the LM head's share, 41 s by its estimate) fits in what the cheap pass leaves above that
    (96 - 54 s), ``ppl`` (6 removals of half the decoder and the head, 47 s) does not in what ``taylor``
    leaves; ranking then stops before the budget."""
    with caplog.at_level(logging.WARNING, logger="layerprune.searching.search"):
        record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                           rank_data=str(corpus["held_out"]), time_budget=2.0, rank_windows=6, batch_size=4,
                           workload=QUICK, algorithm="heuristic")
    assert record.seconds <= 120  # the whole run, scoring included, on the fake clock
    assert "taylor" in record.settings["metrics"] and "ppl" not in record.settings["metrics"]
    assert list(record.budget_left_out)[0] == "metric ppl"
    assert ("had 84 s left (54 s of them kept for ranking the candidates) and this takes about 47 s"
            in record.budget_left_out["metric ppl"])
    assert any("metric ppl skipped" in line for line in caplog.messages)
    unreached = [c for c, reason in record.not_tried if "time budget" in reason]
    assert unreached, "the budget ends before every candidate is ranked"
    assert record.shortfall == (f"time budget spent: ranked {len(record.tried)} of "
                                f"{len(record.tried) + len(unreached)} candidates, metrics ppl not scored; the winner "
                                "is the best of what was ranked, not of the whole search")
    assert any(record.shortfall in line for line in caplog.messages)


def test_a_costly_metric_left_out_for_ranking_is_scored_when_the_ranking_leaves_time(corpus, slowed, caplog) -> None:
    """Ranking 2 windows (one batch) is cheap: of the 120 s, 114 are left after the original's ranking
    (6 s), 57 of them kept for ranking while the metrics are scored, so ``ppl`` (47 s) does not fit in
    the 90 s the cheap pass and ``taylor`` leave. The candidates then rank in 4 s each, and ``ppl`` is
    scored after them, its cuts ranked too, all inside the budget."""
    with caplog.at_level(logging.WARNING, logger="layerprune.searching.search"):
        record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                           rank_data=str(corpus["held_out"]), time_budget=2.0, rank_windows=2, batch_size=4,
                           workload=QUICK, repairs=False, algorithm="heuristic")
    assert any("metric ppl skipped: the time budget (2 min) had 90 s left (57 s of them kept for ranking" in line
               for line in caplog.messages)
    assert any("metric ppl scored after the ranking" in line for line in caplog.messages)
    assert "ppl" in record.settings["metrics"] and "ppl" in record.settings["importance"]
    assert not record.budget_left_out and record.shortfall is None and not record.not_tried
    late = [t.candidate.metric for t in record.tried if t.candidate.metric == "ppl"]
    assert late and record.tried[-1].candidate.metric == "ppl"  # its cuts ranked after every earlier one
    assert record.seconds <= 120
    keys = [t.candidate.key for t in record.tried]
    assert len(keys) == len(set(keys))  # a cut ppl finds again is not ranked twice: its finder is added
    assert record.to_json()["shortfall"] is None


def test_without_a_budget_every_metric_and_candidate_is_ranked(corpus, slowed) -> None:
    record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                       rank_data=str(corpus["held_out"]), rank_windows=6, batch_size=4, workload=QUICK, repairs=False)
    assert {"ppl", "taylor"} <= set(record.settings["metrics"])
    assert not record.not_tried and not record.budget_left_out and record.shortfall is None
    assert record.to_json()["shortfall"] is None


def test_a_short_search_says_so_in_its_report_figure_and_exit_line(corpus, slowed, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["search", "--model", str(corpus["model"]), "--data", str(corpus["calibration"]), "--samples", "8",
                 "--seq-len", "64", "--rank-data", str(corpus["held_out"]), "--rank-windows", "6",
                 "--batch-size", "4", "--remove", "2", "--time-budget", "0.5", "--no-repair", "--out", str(out)])
    assert code == 0
    document = json.loads((out / "search.json").read_text())
    shortfall = document["shortfall"]
    assert shortfall and shortfall.startswith("time budget spent: ranked ")
    assert capsys.readouterr().out.strip().endswith(shortfall)
    assert shortfall[1:] in (out / "search.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0


def test_a_loaded_machine_gets_fewer_generations_within_the_same_budget(corpus, slowed) -> None:
    """An evolutionary search under the same budget on a machine twice as slow: it runs fewer
    generations, both runs end inside the budget (scoring and ranking the finalists included), and the
    generations the budget left out are recorded."""
    def evolution(seconds_per_layer: float) -> lp.SearchRecord:
        slowed[0] = seconds_per_layer
        began = budget_module.clock()  # each run's budget starts at its own call
        record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                           rank_data=str(corpus["held_out"]), time_budget=4.0, rank_windows=6, batch_size=4,
                           workload=QUICK, repairs=False, algorithm="evolution", generations=1000, offspring=4,
                           finalists=2)
        assert budget_module.clock() - began <= 4 * 60
        return record

    idle, loaded = evolution(LAYER_SECONDS), evolution(2 * LAYER_SECONDS)
    runs = [record.settings["evolution"]["generations_run"] for record in (idle, loaded)]
    assert runs[1] < runs[0]  # the idle one runs all 1000: once every 2-of-6 cut is scored, generations are free
    assert loaded.settings["evolution"]["stopped_by"] == "the time budget"
    assert any(what.startswith("evolution generations") for what in loaded.budget_left_out)
    assert not idle.not_tried and not loaded.not_tried  # the finalists' ranking was reserved before


def test_an_evolution_reserves_its_finalists_ranking_as_measured(corpus, slowed, monkeypatch) -> None:
    """Ranking reads the held-out windows through the whole model, LM head included, which the
    calibration pass the metrics are timed on does not run: here a slow head on the ranking's batches
    (as Gemma-3's 262,144-token head is on a CPU). The evolution still stops while the ranking of every
    finalist, each with the repairs that accept it, fits: that ranking is reserved at what the original's
    own ranking took, not derived from the calibration pass (Gemma-3's 20-minute evolution once ranked 3
    of its 12 finalist forms; here that estimate left 5 of 8 unranked)."""
    vocab = json.loads((corpus["model"] / "config.json").read_text())["vocab_size"]
    base, head_seconds = budget_module.clock, [0.0]
    linear = torch.nn.Linear.forward

    def slow_head(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        if self.out_features == vocab and hidden.dim() == 3 and hidden.shape[0] > 1:  # a ranking batch
            head_seconds[0] += 6 * LAYER_SECONDS
        return linear(self, hidden)

    monkeypatch.setattr(torch.nn.Linear, "forward", slow_head)
    monkeypatch.setattr(budget_module, "clock", lambda: base() + head_seconds[0])
    record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                       rank_data=str(corpus["held_out"]), time_budget=4.0, rank_windows=6, batch_size=4,
                       workload=QUICK, algorithm="evolution", generations=1000, offspring=4, finalists=2)
    assert record.settings["evolution"]["stopped_by"] == "the time budget"
    assert len(record.tried) >= 2 and not record.not_tried
    assert record.seconds <= 4 * 60


def test_an_evolution_over_branches_reserves_each_repaired_finalists_statistics(corpus, slowed) -> None:
    """A repaired cut of whole layers reads its statistics from one pass shared by all of them, but a
    repaired cut of branches collects its own: the evolution over branches reserves one pass per
    finalist and repair that reads data, so its last finalist's repairs are ranked too (SmolLM2's
    20-minute evolution over branches once left its ``replace-linear`` forms unranked; here so did
    the shared-pass estimate)."""
    record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                       rank_data=str(corpus["held_out"]), time_budget=4.0, rank_windows=6, batch_size=4,
                       workload=QUICK, algorithm="evolution", granularity="sublayer", generations=1000, offspring=4,
                       finalists=2)
    assert record.settings["evolution"]["stopped_by"] == "the time budget"
    assert any(tried.candidate.repair == "replace-linear" for tried in record.tried)
    assert not record.not_tried
    assert record.seconds <= 4 * 60


def test_an_evolution_keeps_half_its_budget_from_costly_seeds(corpus, slowed) -> None:
    """90 s: of the 78 s left after the original's ranking, an evolution keeps half for its generations,
    so ``taylor`` (36 s of the 66 s left after the cheap pass) does not fit and the time goes to the
    evolution's initial population instead."""
    record = lp.search(str(corpus["model"]), remove=2, calibration=calibration(corpus),
                       rank_data=str(corpus["held_out"]), time_budget=1.5, rank_windows=6, batch_size=4,
                       workload=QUICK, repairs=False, algorithm="evolution", offspring=2, finalists=1)
    assert not {"taylor", "ppl"} & set(record.settings["metrics"])
    assert "had 66 s left (39 s of them kept for the evolution's generations)" in record.budget_left_out["metric taylor"]
    assert record.settings["evolution"]["initial_population"] >= 2


def test_a_cut_found_again_late_joins_the_finders_of_every_form_queued() -> None:
    """A late metric's cut that the queue already holds (plain and repaired) is not queued again: its
    finder is added to each queued form, and a new cut is left alone."""
    plain = Candidate([2, 3], "bi", "independent")
    queue = [plain, replace(plain, repair="rescale", also_found_by=[])]
    again = Candidate([2, 3], "ppl", "independent", also_found_by=["ppl/consecutive"])
    assert found_again(again, queue)
    assert [queued.also_found_by for queued in queue] == [["ppl/independent", "ppl/consecutive"]] * 2
    assert not found_again(Candidate([1, 3], "ppl", "independent"), queue)
    assert queue[0].also_found_by == ["ppl/independent", "ppl/consecutive"]
