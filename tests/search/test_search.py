"""``layerprune.search`` on a tiny model: the winner is the best candidate by an independent
perplexity, the saved recipe replays to the same weights, early dropping spares the eventual
winner, and impossible budgets are refused before anything is written."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

import layerprune as lp
from layerprune.cli.main import build_parser, main
from layerprune.cli.options import check_calibration_args
from layerprune.data import CalibrationConfig, token_stream
from layerprune.errors import OptionError
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.perplexity import perplexity
from layerprune.options import given_options
from layerprune.recipes import load_recipe
from layerprune.recipes.runner import _search_arguments, preflight
from layerprune.records import SCHEMA_DIR, newest_version, schema_file, schema_text
from layerprune.searching import DropRule, SearchConfig, SearchDocument, SearchRecord, rank
from layerprune.searching.report import pareto_figure, pareto_front
from tests.reporting.figure_checks import check_figure

QUICK = Workload(prompt_len=8, new_tokens=2, repeats=1, warmup=0)
SETTINGS = {"rank_windows": 6, "batch_size": 4, "workload": QUICK, "algorithm": "heuristic"}
"""The heuristic search: what this file tests (the evolution, the default: test_evolution.py)."""


def small_calibration(corpus: dict[str, Path]) -> CalibrationConfig:
    return CalibrationConfig(source=str(corpus["calibration"]), samples=8, seq_len=64)


@pytest.fixture(scope="module")
def searched(corpus: dict[str, Path]) -> SearchRecord:
    """One full search (every candidate ranked in full: dropping off) into a folder."""
    return lp.search(str(corpus["model"]), remove=2, calibration=small_calibration(corpus),
                     rank_data=str(corpus["held_out"]), drop_factor=0, out=corpus["folder"] / "out", **SETTINGS)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_the_winner_is_the_best_candidate_by_an_independent_perplexity(searched, corpus: dict[str, Path]) -> None:
    loaded = lp.load_model(corpus["model"])
    stream = token_stream(loaded.tokenizer, str(corpus["held_out"]), "train")
    rows = lp.build_calibration(loaded.tokenizer, str(corpus["calibration"]), samples=8, seq_len=64)
    assert len({tuple(t.candidate.remove) for t in searched.tried}) >= 3  # several distinct cuts were ranked
    recomputed = []
    for tried in searched.tried:
        working = loaded.copy()
        if tried.candidate.repair is None:
            lp.prune(working, tried.candidate.remove)
        else:
            from layerprune.repair import compensate

            compensate(working, tried.candidate.remove, tried.candidate.repair, rows, batch_size=4)
        ppl = perplexity(working.model, stream, 64, max_windows=6).ppl
        assert tried.ppl == pytest.approx(ppl, rel=1e-4), tried.label
        recomputed.append(ppl)
    assert searched.winner_index == min(range(len(recomputed)), key=recomputed.__getitem__)
    assert not any(t.dropped for t in searched.tried)
    original = perplexity(loaded.model, stream, 64, max_windows=6).ppl  # the reference search.md and the figure show
    assert searched.settings["ranking"]["original_ppl"] == pytest.approx(original, rel=1e-4)


def test_the_pareto_figure_shows_the_original_the_winner_and_only_what_is_drawn(searched) -> None:
    figure = pareto_figure(searched)
    check_figure(figure)
    (axis,) = figure.axes
    labels = [t.get_text() for t in axis.get_legend().get_texts()]
    assert labels[:2] == ["original (uncut)", "winner"]
    front = pareto_front([(t.speed.usable, t.ppl) for t in searched.tried])
    assert ("Pareto front" in labels) == (len(front) > 1)
    assert axis.get_title().endswith(f"{len(searched.tried)} candidates")
    assert f"The original (uncut) model scores {searched.settings['ranking']['original_ppl']:.2f}" in (
        searched.out / "search.md").read_text()


def test_the_output_folder_holds_every_candidate_and_the_winner(searched) -> None:
    folder = searched.out
    document = json.loads((folder / "search.json").read_text())
    assert len(document["candidates"]) == len(searched.tried)
    first = document["candidates"][0]
    for key in ("removed_layers", "metric", "strategy", "repair", "held_out_ppl", "parameters",
                "flop_ideal_decode_speedup", "measured_decode_speedup", "seconds", "dropped_early"):
        assert key in first
    assert document["winner_label"] in (folder / "search.md").read_text()
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((folder / "model" / "layerprune.json").read_text())
    assert saved["num_layers"] == 4 and sorted(saved["removed_layers"]) == searched.winner.candidate.remove


def test_the_recipe_replays_the_winner_to_identical_weights(searched, corpus: dict[str, Path], tmp_path: Path) -> None:
    replay = lp.run_recipe(searched.out / "recipe.yaml", tmp_path / "replay", allowed_paths=[corpus["folder"]],
                           log=lambda line: None)
    expected, got = weights(searched.out / "model"), weights(replay / "model")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_early_dropping_never_drops_the_eventual_winner_on_a_constructed_case() -> None:
    """Per-window perplexities: the first candidate sets the bar at 10; the eventual winner starts
    worse (13, under 1.5 x 10) and ends at about 8; a clearly worse one (30) is dropped after its
    4th window, its other windows never computed."""
    def losses(per_window: list[float], seen: list[int]):
        for value in per_window:
            seen.append(1)
            yield math.log(value) * 10, 10, 1  # 10 tokens per window at perplexity `value`

    cases = {"first": [10.0] * 8, "worse": [30.0] * 8, "winner": [13.0, 13.0, 12.0, 6.0, 6.0, 5.0, 5.0, 5.0]}
    rule, best, results, seen = DropRule(after=4, factor=1.5), None, {}, {}
    for name, per_window in cases.items():
        seen[name] = []
        results[name] = rank(losses(per_window, seen[name]), rule, best)
        if not results[name].dropped and (best is None or results[name].ppl < best):
            best = results[name].ppl
    assert not results["winner"].dropped and results["winner"].ppl == pytest.approx(
        math.exp(sum(map(math.log, cases["winner"])) / 8))
    assert best == results["winner"].ppl
    assert results["worse"].dropped and len(seen["worse"]) == 4


def test_the_pareto_front_keeps_the_points_nothing_beats() -> None:
    assert pareto_front([(1.2, 10.0), (1.5, 12.0), (1.5, 11.0), (1.1, 13.0)]) == [0, 2]


@pytest.mark.parametrize(("flags", "reason"), [
    (["--remove", "6"], "would remove all 6 layers"),
    (["--target-speedup", "1000"], "out of reach"),
    (["--time-budget", "0"], "--time-budget must be more than 0"),
    (["--max-candidates", "0"], "--max-candidates must be at least 1"),
])
def test_bad_budgets_exit_2_with_the_reason_and_write_nothing(flags: list[str], reason: str, corpus: dict[str, Path],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["search", "--model", str(corpus["model"]), "--data", str(corpus["calibration"]), "--rank-data",
                 str(corpus["held_out"]), "--samples", "4", "--seq-len", "32", "--out", str(out), *flags])
    assert code == 2
    assert reason in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method", ["rescale", "replace-linear"])
def test_a_recipe_repair_section_gives_the_weights_of_compensate(method: str, corpus: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """The recipe stage a search's recipe relies on, for the repairs that read calibration rows."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {corpus['model']}\n"
                      f"calibration: {{source: {corpus['calibration']}, samples: 8, seq_len: 64}}\n"
                      "score: {metrics: [ppl]}\nselect: {remove: 2, strategy: consecutive}\n"
                      f"repair: {{method: {method}, batch_size: 4}}\n")
    run = lp.run_recipe(recipe, tmp_path / "run", allowed_paths=[corpus["folder"]], log=lambda line: None)
    layers = json.loads((run / "scores.json").read_text())["selection"]["remove"]
    loaded = lp.load_model(corpus["model"])
    rows = lp.build_calibration(loaded.tokenizer, str(corpus["calibration"]), samples=8, seq_len=64)
    lp.compensate(loaded, layers, method, rows, batch_size=4)
    lp.save(loaded, tmp_path / "direct")
    expected, got = weights(tmp_path / "direct"), weights(run / "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_command_writes_the_folder_and_names_the_winner(corpus: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["search", "--model", str(corpus["model"]), "--data", str(corpus["calibration"]), "--rank-data",
                 str(corpus["held_out"]), "--samples", "8", "--seq-len", "64", "--rank-windows", "4",
                 "--remove", "33%", "--max-candidates", "3", "--no-repair", "--out", str(out)])
    assert code == 0
    document = json.loads((out / "search.json").read_text())
    assert len(document["candidates"]) == 3 and document["remove"] == 2
    assert document["winner_label"] in capsys.readouterr().out
    assert main(["search", "--model", str(corpus["model"]), "--data", str(corpus["calibration"]), "--out",
                 str(tmp_path / "other")]) == 2  # a local file without --rank-data has no held-out text
    assert "--rank-data" in capsys.readouterr().err


def test_a_spent_time_budget_still_ranks_one_candidate_and_lists_the_rest(corpus: dict[str, Path]) -> None:
    record = lp.search(str(corpus["model"]), remove=2, calibration=small_calibration(corpus),
                       rank_data=str(corpus["held_out"]), time_budget=1e-6, repairs=False, **SETTINGS)
    assert len(record.tried) == 1 and record.winner_index == 0
    document = record.to_json()
    assert len(document["not_tried"]) >= 1
    not_made = document["selections_not_made"]
    assert not_made and all(pair.endswith("/iterative") for pair in not_made)
    assert "time budget" in not_made["bi/iterative"]
    assert set(document["budget_left_out"]) == {"metric ppl", "metric taylor"}  # the costly metrics: never scored
    assert document["metrics"] == [m for m in document["metrics"] if m not in ("ppl", "taylor")]
    assert document["shortfall"].startswith(f"time budget spent: ranked 1 of {1 + len(document['not_tried'])} ")


def test_a_recipe_search_stage_finds_the_winner_then_evaluates_it(searched, corpus: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """``search:`` in a recipe runs lp.search on the calibration section's data; the later stages
    take its winner. Same settings as the ``searched`` fixture, so the same winner."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {corpus['model']}\n"
                      f"calibration: {{source: {corpus['calibration']}, samples: 8, seq_len: 64}}\n"
                      f"search: {{remove: 2, rank_data: {corpus['held_out']}, rank_windows: 6, batch_size: 4,\n"
                      "         drop_factor: 0, algorithm: heuristic}\n"
                      f"eval: {{ppl: [{corpus['held_out']}], seq_len: 64, max_windows: 2}}\n")
    run = lp.run_recipe(recipe, tmp_path / "run", allowed_paths=[corpus["folder"]], log=lambda line: None)
    state = json.loads((run / "run.json").read_text())["stages"]
    assert state["search"]["winner"] == searched.winner.label
    expected, got = weights(searched.out / "model"), weights(run / "search" / "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert state["eval"]["compared"] == [str(run / "search" / "model")]
    clash = tmp_path / "clash.yaml"
    clash.write_text(recipe.read_text() + "score: {metrics: [bi]}\n")
    with pytest.raises(lp.UsageError, match="'search' chooses and repairs the cut itself"):
        lp.run_recipe(clash, tmp_path / "clash", allowed_paths=[corpus["folder"]], log=lambda line: None)
    assert not (tmp_path / "clash").exists()


def test_a_repair_that_refuses_its_data_is_recorded_and_the_search_goes_on(corpus: dict[str, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A singular system (here: every replace-linear fit refused) ends no search: the refusal is
    listed with its reason under skipped_repairs, and every other candidate is still ranked."""
    import layerprune.repair.linear as linear

    def refuse(*args, label: str, **kwargs):
        raise lp.UsageError(f"the least-squares system of the removed run {label} is singular")

    monkeypatch.setattr(linear, "solve_linear_map", refuse)
    record = lp.search(str(corpus["model"]), remove=2, calibration=small_calibration(corpus),
                       rank_data=str(corpus["held_out"]), drop_factor=0, **SETTINGS)
    document = record.to_json()
    refused = [s for s in document["skipped_repairs"] if s["repair"] == "replace-linear" and "singular" in s["reason"]]
    assert refused and not any(t.candidate.repair == "replace-linear" for t in record.tried)
    assert {t.candidate.repair for t in record.tried} >= {None, "rescale", "merge"}
    assert not document["not_tried"]  # refused is not "not tried for lack of budget"


def test_search_json_is_a_versioned_record_its_shipped_schema_accepts(searched) -> None:
    """search.json is checked against SearchDocument when written; the schema shipped in the package
    and in docs/schemas is the one the model generates (python docs/gen_api.py), and it has teeth."""
    name = schema_file(SearchDocument)
    assert (SCHEMA_DIR / name).read_text() == schema_text(SearchDocument)
    assert (Path(__file__).parents[2] / "docs" / "schemas" / name).read_text() == schema_text(SearchDocument)
    schema = json.loads((SCHEMA_DIR / name).read_text())
    document = json.loads((searched.out / "search.json").read_text())
    jsonschema.validate(document, schema)
    assert document["format_version"] == newest_version(SearchDocument)
    assert SearchConfig(**document["options"]) == SearchConfig(remove=2, rank_data=document["options"]["rank_data"],
                                                               rank_windows=6, batch_size=4, drop_factor=0,
                                                               algorithm="heuristic")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({key: value for key, value in document.items() if key != "candidates"}, schema)


def test_the_search_options_have_one_default_and_each_front_end_names_a_bad_one_its_way(tmp_path: Path) -> None:
    """SearchConfig is the API's, the flags' and the recipe section's default; a bad value is the same
    refusal, named by its keyword in Python, by its flag on the command line (see the bad budgets
    above), by its section key and line in a recipe."""
    parser = next(action for action in build_parser()._actions
                  if isinstance(action, argparse._SubParsersAction)).choices["search"]
    args = parser.parse_args(["--model", "m", "--out", "o"])
    check_calibration_args(args)
    assert SearchConfig(**given_options(args, SearchConfig)) == SearchConfig()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: some-org/not-downloaded\nsearch: {}\n")
    assert _search_arguments(load_recipe(recipe)) == (SearchConfig(), {})
    with pytest.raises(OptionError, match="^time_budget must be more than 0 minutes"):
        lp.search("some-org/not-downloaded", time_budget=0)
    recipe.write_text("model: some-org/not-downloaded\nsearch:\n  remove: 2\n  time_budget: 0\n")
    with pytest.raises(lp.UsageError, match="line 4: search.time_budget must be more than 0 minutes"):
        preflight(load_recipe(recipe), tmp_path / "out")
    recipe.write_text(f"model: some-org/not-downloaded\ncalibration: {{source: {tmp_path / 'text.txt'}}}\n"
                      "search: {remove: 2}\n")
    (tmp_path / "text.txt").write_text("a local file has no held-out split")
    with pytest.raises(lp.UsageError, match="line 3: search.rank_data is needed: the calibration data .* is a local"):
        preflight(load_recipe(recipe), tmp_path / "out")
    recipe.write_text("model: some-org/not-downloaded\nsearch: {heal: lora}\n")  # a recipe heals in its heal section
    with pytest.raises(lp.UsageError, match="unknown key 'heal' in section 'search'"):
        load_recipe(recipe)
