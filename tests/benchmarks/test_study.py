"""The reproduction study's bookkeeping on a tiny checkpoint: every requested cell filled, twins
measured once, a changed healing budget that redoes only the healed cells it names, and a re-run
that computes nothing. The real grid takes hours; its logic is checked here in about a minute."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import save_tiny_checkpoint

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "study.py"


@pytest.fixture
def study(tmp_path, monkeypatch) -> ModuleType:
    """study.py as a module whose cells and replacement pairs live in a temporary cache (the text
    data stays in the shared cache: it is the real wiki-sample and sentiment data)."""
    from layerprune.healing import replacement

    spec = importlib.util.spec_from_file_location("study_under_test", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
        expected_entry = (f"{study._retained_text(cell['retained'])} / {cell['ppl']:.4g}" if cell
                          else "n/a" if heal in ("replace-linear", "merge", "replace-layer") else "—")
        assert entry.rstrip(" |") == expected_entry
    gains = text.split("#### RP gained by healing at 25%")[1]
    bi_gains = next(line for line in gains.splitlines() if line.startswith("| bi |"))
    rescaled = study.retained_difference(base["correct"], done["bi_25_rescale"]["correct"],
                                         done["bi_25_none"]["correct"])
    assert f"{rescaled['mean']:+.2f} [{rescaled['ci95'][0]:+.2f}, {rescaled['ci95'][1]:+.2f}]" in bi_gains
