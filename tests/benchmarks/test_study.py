"""The reproduction study's bookkeeping on a tiny checkpoint: every requested cell filled, twins
measured once, a changed healing budget that redoes only the healed cells it names, and a re-run
that computes nothing. The real grid takes hours; its logic is checked here in about a minute."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import save_tiny_checkpoint, script_module, tiny_loaded

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "study.py"


@pytest.fixture
def study(tmp_path, monkeypatch) -> ModuleType:
    """study.py as a module whose cells and replacement pairs live in a temporary cache (the text
    data stays in the shared cache: it is the real wiki-sample and sentiment data)."""
    from layerprune.healing import replacement

    module = script_module(STUDY, "study_under_test")
    monkeypatch.setattr(module, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(replacement, "cache_dir", lambda: tmp_path / "cache")
    return module


def run(study: ModuleType, monkeypatch, model: Path, results: Path, *extra: str) -> None:
    argv = ["study.py", "--models", str(model), "--metrics", "bi,angular,block-cosine", "--ratios", "12%,25%",
            "--heals", "none,lora,replace-layer", "--samples", "4", "--seq-len", "64", "--ppl-windows", "2",
            "--task-limit", "8", "--heal-steps", "2", "--heal-rows", "2", "--results", str(results), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    assert study.main() == 0


def cells(folder: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in folder.glob("*_*_*.json")}


def test_study_fills_the_grid_measures_twins_once_and_resumes(study, tmp_path, monkeypatch) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    results = tmp_path / "docs" / "RESULTS.md"
    run(study, monkeypatch, model, results)

    folder = study.study_dir(str(model))
    assert folder.is_relative_to(tmp_path / "cache")  # a model path names a folder in the cache, not itself
    done = cells(folder)
    # 3 metrics x 2 ratios x (none, lora), and replacement of the 2 consecutive metrics' 2-layer blocks
    # (at 25%): replacing one layer (12% of 6) by one is no replacement, nor is BI's selection consecutive
    assert len(done) == 14
    assert {stem for stem in done if stem.endswith("replace-layer")} == {"angular_25_replace-layer",
                                                                        "block-cosine_25_replace-layer"}
    # angular distance is a monotone function of block cosine, so both choose the same block: measured once
    for stem, cell in done.items():
        if cell["metric"] == "block-cosine":
            twin = done[stem.replace("block-cosine", "angular")]
            assert cell["same_as"] in ("angular", "bi") and cell["ppl"] == twin["ppl"]
    assert [len(done[f"bi_{r}_none"]["removed"]) for r in (12, 25)] == [1, 2]  # 12% and 25% of 6 layers
    assert done["bi_25_lora"]["heal_budget"] == {"steps": 2, "rows": 2, "seq_len": 128}
    assert done["bi_25_lora"]["removed"] == done["bi_25_none"]["removed"]
    replaced = done["angular_25_replace-layer"]
    assert replaced["layers"] == 5 and replaced["selected"] == done["angular_25_none"]["removed"]

    text = results.read_text()
    assert "Cells finished: 14." in text
    lora_row = text.split("#### Healing: lora")[1].split("\n| bi |")[1].split("\n")[0]
    # 12% and 25% filled; 37% and 50% were not asked for, so they get no column
    assert "—" not in lora_row and lora_row.count("×") == 4 and "| 37% |" not in text
    replaced_table = text.split("#### Healing: replace-layer")[1]
    bi_row, angular_row = (replaced_table.split(f"\n| {m} |")[1].split("\n")[0] for m in ("bi", "angular"))
    assert bi_row.count("n/a") == 2  # BI's layers are not one consecutive block at either ratio
    # angular: 12% is a single layer (does not apply), 25% is filled
    angular_cells = [part.strip() for part in angular_row.split("|")[:2]]
    assert angular_cells[0] == "n/a" and "×" in angular_cells[1]
    assert (results.parent / "figures" / f"study-{study.file_stem(str(model))}-ratio-curves.png").stat().st_size

    # A new healing budget redoes the healed cells it names, and nothing else.
    before = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.json")}
    narrow = ("--metrics", "bi", "--ratios", "25%", "--heals", "none,lora", "--heal-steps", "3")
    run(study, monkeypatch, model, results, *narrow)
    after = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.json")}
    assert {name for name in before if after[name] != before[name]} == {"bi_25_lora.json"}
    assert cells(folder)["bi_25_lora"]["heal_budget"]["steps"] == 3

    # A re-run finds every cell finished: nothing is healed, measured or rewritten.
    for name in ("measure", "decode_speed"):
        monkeypatch.setattr(study, name, lambda *args, **kwargs: pytest.fail("a finished cell was measured again"))
    monkeypatch.setattr(study.lp, "heal", lambda *args, **kwargs: pytest.fail("a finished cell was healed again"))
    run(study, monkeypatch, model, results, *narrow)
    run(study, monkeypatch, model, results, "--heals", "none,replace-layer")
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.json")} == after


def test_training_free_repairs_are_study_cells_with_retained_performance(study, tmp_path, monkeypatch) -> None:
    """The repairs run as healings on the healing budget's rows; every cell keeps each example's
    answer, and RP against the unpruned model equals a hand computation from them."""
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    results = tmp_path / "docs" / "RESULTS.md"
    run(study, monkeypatch, model, results, "--metrics", "bi", "--ratios", "25%",
        "--heals", "none,rescale,replace-linear,merge", "--task-limit", "16")
    folder = study.study_dir(str(model))
    done = cells(folder)
    base = json.loads((folder / "unpruned.json").read_text())
    removed = done["bi_25_none"]["removed"]
    expected = {"bi_25_none", "bi_25_rescale"} | ({"bi_25_replace-linear", "bi_25_merge"} if 0 not in removed else set())
    assert set(done) == expected
    text = results.read_text()
    # a two-way sentiment task on balanced examples: even a constant answer gets half right
    assert all(sum(right) for right in base["correct"].values())
    for stem, cell in done.items():
        assert cell["removed"] == removed and set(cell["correct"]) == set(base["correct"])
        by_hand = [sum(cell["correct"][t]) / sum(base["correct"][t]) for t in base["correct"]]
        assert cell["retained"]["mean"] == pytest.approx(sum(by_hand) / len(by_hand))
    assert "RP " in text
    # a report outside docs/ would break the claims' relative links: it points to them instead
    assert "## The papers' claims" not in text and "docs/claims.md" in text
    assert "#### Healing: rescale" in text and "#### Healing: merge" in text
    # one ratio ran: the tables show its column only, and the summary puts the healings side by side
    assert "| metric | 25% |" in text and "| 12% |" not in text
    summary = text.split("#### Retained performance at 25%, by healing")[1]
    bi_row = next(line for line in summary.splitlines() if line.startswith("| bi |")).split(" | ")[1:]
    heals = summary.split("| metric | ")[1].split(" |\n")[0].split(" | ")
    for heal, entry in zip(heals, bi_row):
        cell = done.get(f"bi_25_{heal}")
        low, high = cell["retained"]["ci95"] if cell else (None, None)
        expected_entry = (f"{cell['retained']['mean']:.2f} [{low:.2f}, {high:.2f}] / {cell['ppl']:.4g}" if cell
                          else "n/a" if heal in ("replace-linear", "merge", "replace-layer") else "—")
        assert entry.rstrip(" |") == expected_entry
    gains = text.split("#### RP gained by healing at 25%")[1]
    bi_gains = next(line for line in gains.splitlines() if line.startswith("| bi |"))
    rescaled = study.retained_difference(base["correct"], done["bi_25_rescale"]["correct"],
                                         done["bi_25_none"]["correct"])
    assert f"{rescaled['mean']:+.2f} [{rescaled['ci95'][0]:+.2f}, {rescaled['ci95'][1]:+.2f}]" in bi_gains

    # A fresh machine has no cache: --report-only renders the same report and CSV from the CSV alone,
    # the paired RP gains included (the CSV keeps the gain, not the answers it came from).
    grid = study.results_csv(results)
    written, csv_text = results.read_text(), grid.read_text()
    shutil.rmtree(tmp_path / "cache" / "study")
    run(study, monkeypatch, model, results, "--metrics", "bi", "--ratios", "25%", "--report-only")
    assert results.read_text() == written and grid.read_text() == csv_text


def write_cell(folder: Path, stem: str, cell: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(cell))


def test_the_grid_round_trips_through_its_csv(study, tmp_path, monkeypatch) -> None:
    """Cells as the study caches them give the same tables as the CSV written from them does, and
    the tables print what the cells hold (the format the committed tables were written in); no model
    is loaded, the cells are made here."""
    folder = tmp_path / "cells"
    monkeypatch.setattr(study, "study_dir", lambda name: folder)
    base_correct = {"t1": [1, 1, 0, 1, 1, 0, 1, 1], "t2": [0, 1, 1, 1, 0, 1, 1, 0]}
    write_cell(folder, "unpruned", {"layers": 30, "removed": [], "ppl": 36.891, "ppl_tokens": 4080,
                                    "accuracy": {"t1": 0.75, "t2": 0.625}, "correct": base_correct})

    def cell(metric: str, heal: str, removed: list[int], ppl: float, correct: dict, **extra) -> dict:
        return {"metric": metric, "ratio": "12%", "heal": heal, "layers": 30 - len(removed), "removed": removed,
                "ppl": ppl, "ppl_tokens": 4080, "accuracy": {"t1": 0.73, "t2": 0.5}, "stability": {"t1": 0.87, "t2": 0.9},
                "speedup": 1.3412, "ideal_speedup": 1.1234, "correct": correct,
                "retained": study.retained_performance(base_correct, correct), **extra}

    worse = {"t1": [1, 0, 0, 1, 1, 0, 1, 0], "t2": [0, 1, 0, 1, 0, 1, 1, 0]}
    write_cell(folder, "bi_12_none", cell("bi", "none", [8, 9, 20, 21], 64.5512, worse))
    write_cell(folder, "bi-iterative_12_none", cell("bi-iterative", "none", [8, 9, 20, 21], 64.5512, worse,
                                                    same_as="bi"))
    write_cell(folder, "bi_12_lora", cell("bi", "lora", [8, 9, 20, 21], 54.72, base_correct))
    write_cell(folder, "magnitude-l1_12_none", cell("magnitude-l1", "none", [0, 1, 2, 3], 5.761e4, worse))
    rows = study.cache_rows("toy")
    tables = study.model_tables("toy", rows)

    grid = tmp_path / "RESULTS-cells.csv"
    study.write_cells_csv(grid, {"date": "2026-11-24"}, {"toy": rows})
    meta, stored = study.read_cells_csv(grid)
    assert meta == {"date": "2026-11-24"} and set(stored) == {"toy"}
    assert study.model_tables("toy", stored["toy"]) == tables

    retained = study.retained_performance(base_correct, worse)
    rp = f"RP {retained['mean']:.2f} [{retained['ci95'][0]:.2f}, {retained['ci95'][1]:.2f}]"
    assert f"| bi | 64.55 / 0.615 / 0.89 / 1.34× (1.12×) / {rp} |" in tables
    assert f"| bi-iterative | 64.55 / 0.615 / 0.89 / 1.34× (1.12×) / {rp} = bi |" in tables
    assert "Unpruned: 30 layers, held-out perplexity 36.89 (4,080 tokens), zero-shot accuracy t1 0.750, t2 0.625." in tables
    gain = study.retained_difference(base_correct, base_correct, worse)
    assert f"{gain['mean']:+.2f} [{gain['ci95'][0]:+.2f}, {gain['ci95'][1]:+.2f}]" in tables.split("#### RP gained")[1]
    # magnitude-L1's cut starts at layer 0: nothing precedes it to fold into (n/a), while a rescale could run (—)
    repairs = {heal: tables.split(f"#### Healing: {heal}")[1] for heal in ("replace-linear", "rescale")}
    assert all(text.startswith("\n\nNo ") for text in repairs.values())  # no such cell ran: no table of dashes
    side_by_side = tables.split("#### Retained performance at 12%, by healing")[1]
    l1 = next(line for line in side_by_side.splitlines() if line.startswith("| magnitude-l1 |")).split(" | ")
    heals = side_by_side.split("| metric | ")[1].split(" |\n")[0].split(" | ")
    assert {heal: l1[1 + i].rstrip(" |") for i, heal in enumerate(heals) if heal in study.REPAIRS} == {
        "replace-linear": "n/a", "rescale": "—", "merge": "n/a"}


def test_report_reads_claims_then_figures_then_the_grid(study, tmp_path, monkeypatch) -> None:
    """The report is a results section: settings with the models' quantization, one line per claim of
    docs/claims.md, one figure per model, then the full grid; rendered here from a CSV alone."""
    monkeypatch.setattr(study, "cache_rows", lambda name: None)  # no cache: the CSV is all there is
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    meta = {"date": "2026-11-24", "machine": "x86_64", "cores": "2", "python": "3.11.7", "versions": "torch 2.13.0",
            "samples": "16", "seq_len": "256", "ppl_windows": "16", "task_limit": "100", "tasks": "lp_sentiment_rt",
            "heal_steps": "20", "heal_rows": "4"}
    rows = {}
    for model in study.MODELS:
        base = study._row(model, study.UNPRUNED, status="measured", layers=18, ppl=40.0, ppl_tokens=4080,
                          accuracy=0.62, task_accuracy={"lp_sentiment_rt": 0.62})
        cut = study._row(model, ("bi", "25%", "none"), status="measured", layers=14, ppl=495.3, accuracy=0.51,
                         stability=0.15, speedup=1.41, ideal_speedup=1.12)
        rows[model] = {study.UNPRUNED: base, ("bi", "25%", "none"): cut}
    study.write_cells_csv(study.results_csv(results), meta, rows)
    # the real claims, beside the report as docs/claims.md is beside docs/RESULTS.md
    monkeypatch.setattr(study, "CLAIMS", Path(shutil.copy(study.CLAIMS, results.parent / "claims.md")))
    monkeypatch.setattr(sys, "argv", ["study.py", "--report-only", "--results", str(results)])
    assert study.main() == 0
    text = results.read_text()

    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Claims", "## Figures", "## Appendix A: the full grid", "## Appendix B: the claims in full"]
    assert "from cells measured up to 2026-11-24 on x86_64" in text  # the measuring machine, not this one
    assert "GGUF Q4_1 de-quantized" in text and "GGUF Q4_K_M de-quantized" in text
    claims = text.split("## Claims")[1].split("## Figures")[0]
    papers = study.claim_rows()
    assert len(papers) >= 9 and all(f"| {paper} | {claim} | {verdict} | {headline} |" in claims
                                    for paper, claim, verdict, headline, _ in papers)
    figures = text.split("## Figures")[1].split("## Appendix A")[0]
    for model in study.MODELS:
        assert f"(figures/{study.ratio_curves_name(model)})" in figures
        assert (results.parent / "figures" / study.ratio_curves_name(model)).stat().st_size
    appendix = text.split("## Appendix A: the full grid")[1]
    assert "[RESULTS-cells.csv](RESULTS-cells.csv)" in appendix and "| bi | 495.3 / 0.510 / 0.15 / 1.41× (1.12×) |" in appendix


def _figure_rows(study, ratios: tuple[str, ...]) -> dict:
    rows = {study.UNPRUNED: study._row("toy", study.UNPRUNED, status="measured", layers=30, ppl=36.9, accuracy=0.8)}
    for step, ratio in enumerate(ratios):
        for heal, gain in (("none", 1.0), ("lora", 0.8)):
            for index, metric in enumerate(("bi", "angular", "block-cosine")):
                same = metric == "block-cosine"  # the same layers as angular: the same cells
                worse = (1 + step) * (1 + (1 if same else index)) * gain
                rows[(metric, ratio, heal)] = study._row("toy", (metric, ratio, heal), status="measured",
                                                         ppl=60.0 * worse, accuracy=0.7 / worse)
    return rows


@pytest.mark.parametrize("ratios", [("25%",), ("12%", "25%", "37%")], ids=["one ratio", "three ratios"])
def test_the_ratio_figure_never_pretends_one_ratio_is_a_curve(study, ratios) -> None:
    from tests.reporting.figure_checks import check_figure

    figure = study.ratio_figure("toy", _figure_rows(study, ratios))
    check_figure(figure)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "block-cosine (= angular, drawn over it)" in labels  # the hidden series is noted
    assert "unpruned accuracy (0.80)" in labels  # the reference line is labelled
    bottoms = [axis for axis in figure.axes if axis.get_visible() and axis.get_xlabel()]
    if len(ratios) == 1:
        assert [t.get_text() for t in bottoms[0].get_xticklabels()] == ["none", "lora"]  # categories, not 24-26
    else:
        assert all(list(axis.get_xticks()) == [12, 25, 37] for axis in bottoms)


@pytest.mark.parametrize("heal", ["rescale", "lora"])
def test_a_repair_cell_reads_the_same_rows_as_a_healed_one(study, heal) -> None:
    """The study's repairs are fitted on the healers' budget (steps x rows windows), not on the
    calibration's default row count that ``heal`` gives a repair taking no steps."""
    original = tiny_loaded("llama", num_layers=6)
    pruned = original.copy()
    study.lp.prune(pruned, [2, 3])
    healed = study.heal_cell(pruned, heal, original, argparse.Namespace(heal_steps=3, heal_rows=4))
    drawn = healed.lineage["healing"][-1]["data"]
    assert (drawn["rows"], drawn["seq_len"]) == (12, study.HEAL_SEQ_LEN)
