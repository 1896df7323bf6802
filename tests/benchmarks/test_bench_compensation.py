"""The compensation benchmark on a tiny checkpoint: every column of a cut is measured, a repair is
timed against a plain forward pass over the same rows, and its memory is the growth of the
resident set during the repair alone (the models loaded before it do not count)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import save_tiny_checkpoint, script_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compensation.py"


@pytest.fixture
def bench(tmp_path, monkeypatch) -> ModuleType:
    from layerprune.healing import replacement

    module = script_module(BENCH, "bench_compensation_under_test")
    monkeypatch.setattr(module, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(replacement, "cache_dir", lambda: tmp_path / "cache")  # its trained pairs
    return module


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_growth_sees_what_the_work_allocates_and_not_what_came_before(bench) -> None:
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB resident before the measured work: not its cost
    _, _, idle = bench.peak_growth(lambda: None)
    block, seconds, grown = bench.peak_growth(lambda: torch.ones(128 * 2**20 // 4))  # 128 MiB, touched
    assert idle < 16 and 120 <= grown < 160 and seconds >= 0
    del held, block


def test_every_column_of_a_cut_is_measured_and_repairs_are_timed_against_a_forward(bench, tmp_path,
                                                                                  monkeypatch) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    argv = ["bench_compensation.py", "--models", str(model), "--shares", "34", "--cuts", "angular",
            "--samples", "8", "--seq-len", "64", "--max-windows", "2", "--heal-steps", "1", "--heal-rows", "2",
            "--heal-seq-len", "32", "--no-doc"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(bench, "cut_layers", lambda *args: [2, 3])  # a block every column applies to
    bench.main()
    results = json.loads(next((tmp_path / "cache" / "bench-compensation").glob("results-*.json")).read_text())
    cells = {key.split("|")[-1]: cell for key, cell in results.items()}
    # the iterative column stands beside an independent cut only: the angular block has none
    assert set(cells) == set(bench.COLUMNS) - set(bench.ITERATIVE)
    assert all(cell["removed"] == [2, 3] for cell in cells.values())
    for column in ("replace-linear", "rescale", "merge"):
        cell = cells[column]
        assert cell["forward_seconds"] > 0 and cell["repair_seconds"] >= cell["statistics_seconds"]
        # the stored seconds are rounded to 0.1 ms and the ratio to 0.001, so ratio x forward misses the
        # repair's seconds by at most 0.0005 x forward (the ratio's rounding) + 0.00005 x (ratio + 1)
        cost, forward = cell["cost_vs_forward"], cell["forward_seconds"]
        assert abs(cost * forward - cell["repair_seconds"]) <= 5e-4 * forward + 5e-5 * (cost + 1) + 1e-9
    cosine = cells["replace-linear-cosine"]  # its Adam steps are timed apart from the statistics and fold
    assert 0 < cosine["solver_seconds"] < cosine["repair_seconds"] and cells["replace-linear"]["solver_seconds"] == 0
    run = cosine["runs"][0]
    assert run["cosine_steps"] == 300 and run["cosine_distance_after"] < run["cosine_distance_before"]
    assert cells["lora"]["heal_budget"] == {"steps": 1, "rows": 2, "seq_len": 32}
    assert cells["rescale+lora"]["runs"] == cells["rescale"]["runs"]  # the same repair, then healed


def test_iterative_rescale_scores_the_repaired_model_before_each_removal(bench, tmp_path, monkeypatch) -> None:
    """The column is Prune&Comp's iterative pruning through the API: the same layers, in the same
    order, as ``compensate_iteratively`` picks on the same rows, and one rescale per removal."""
    import layerprune as lp
    from layerprune.repair.iterative import compensate_iteratively

    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    monkeypatch.setattr(sys, "argv", ["bench_compensation.py", "--models", str(model), "--shares", "50", "--cuts",
                                      "bi", "--samples", "8", "--seq-len", "64", "--max-windows", "2", "--columns",
                                      "none,rescale-iterative", "--no-doc"])
    bench.main()
    results = json.loads(next((tmp_path / "cache" / "bench-compensation").glob("results-*.json")).read_text())
    cell = results[f"{model}|bi|50|rescale-iterative"]
    reference = lp.load_model(str(model))
    rows = lp.build_calibration(reference.tokenizer, "wiki-sample", samples=8, seq_len=64, sampling="contiguous")
    expected = compensate_iteratively(reference, lp.score(reference, rows, ["bi"]), 3, "rescale", rows,
                                      rescore=lambda name: lp.score(reference, rows, [name]).results[name])
    assert cell["removed"] == expected.remove and len(cell["runs"]) == 3
    assert cell["removal_order"] == [step["removed"] for step in expected.steps]
    assert "cost_vs_forward" not in cell  # re-scoring is part of the method: no ratio to one pass


def test_report_only_rewrites_the_table_from_saved_cells_without_measuring(bench, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "cache" / "bench-compensation"
    folder.mkdir(parents=True)
    saved = {"m|bi|25|none": {"ppl": 133.5, "seconds": 0.0, "load_average": 1.5},
             "m|bi|25|rescale": {"ppl": 115.7, "seconds": 12.1, "cost_vs_forward": 0.59, "load_average": 1.9}}
    (folder / "results-40x256-16.json").write_text(json.dumps(saved))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Compensation\n\nintro\n")
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench, "measure", lambda *args: pytest.fail("--report-only measured a cell"))
    monkeypatch.setattr(sys, "argv", ["bench_compensation.py", "--max-windows", "16", "--report-only"])
    bench.main()
    text = doc.read_text()
    assert "intro" in text and "| m | bi | 25% | 133.5 | 115.7 | 12.1 | 0.59 | – |" in text
    assert "1.5-1.9" in text  # the cells' load range, read from the saved cells
