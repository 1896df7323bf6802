"""benchmarks/fidelity_reread.py on a tiny checkpoint: every requested cell re-read and cached, its
fidelity the library's on the same windows, twins measured once, a re-run that computes nothing and
leaves the study's cache alone; and the comparisons' reading against RP on constructed cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

import layerprune as lp
from layerprune.evaluation.fidelity import dataset_fidelity
from tests.helpers import save_tiny_checkpoint, script_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity_reread.py"


@pytest.fixture
def reread(tmp_path, monkeypatch) -> ModuleType:
    """The script as a module whose cells live in a temporary results folder, the study's cells and the
    original's continuations in a temporary cache."""
    from layerprune.healing import replacement

    module = script_module(SCRIPT, "fidelity_reread_under_test")
    for owner in (module, module.study, replacement):
        monkeypatch.setattr(owner, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


ARGS = ["--metrics", "bi,angular,block-cosine", "--heals", "none,lora", "--prompts", "2", "--generation-tokens", "4",
        "--samples", "4", "--seq-len", "64", "--ppl-windows", "2", "--task-limit", "6", "--heal-steps", "2",
        "--heal-rows", "2"]


def test_reread_measures_each_cell_once_and_resumes(reread, tmp_path, monkeypatch) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=6)
    doc = tmp_path / "benchmarks.md"
    argv = ["--models", str(model), "--doc", str(doc), *ARGS]
    assert reread.main(argv) == 0

    args = reread.parse_args(argv)
    cells = reread.cached_cells(str(model), args)
    assert set(cells) == {(m, h) for m in ("bi", "angular", "block-cosine") for h in ("none", "lora")}
    # angular distance is a monotone function of block cosine: the same block, measured once (on this
    # tiny model BI may choose it too, and then block-cosine's cell is BI's)
    for heal in ("none", "lora"):
        twin = cells["block-cosine", heal]
        assert twin["same_as"] in ("angular", "bi") and twin["fidelity"] == cells[twin["same_as"], heal]["fidelity"]
        assert twin["selected"] == cells["angular", "none"]["selected"]
    assert cells["bi", "lora"]["selected"] == cells["bi", "none"]["selected"]
    assert not (reread.study.study_dir(str(model))).exists()  # the study's own cache is read, never written

    original = lp.load_model(str(model))
    for metric in ("bi", "angular"):
        cell = cells[metric, "none"]
        assert len(cell["selected"]) == 2 and cell["layers"] == 4  # 25% of 6 layers
        pruned = original.copy()
        lp.prune(pruned, cell["selected"])
        library = dataset_fidelity(original.model, {"cut": pruned.model}, original.tokenizer, "wiki-sample", 64,
                                   max_windows=2)["cut"].as_dict()
        measured = cell["fidelity"]
        assert measured["kl"] == pytest.approx(library["kl"], rel=1e-6)
        assert measured["top1_agreement"] == library["top1_agreement"]
        assert measured["tokens"] == library["tokens"] == sum(measured["window_tokens"]) == 2 * 63
        assert measured["kl_ci95"] == pytest.approx(library["kl_ci95"], rel=1e-6)
        generation = cell["generation"]
        assert generation["prompts"] == 2 and len(generation["agreed"]) == 2
        assert generation["mean_agreed_tokens"] == sum(generation["agreed"]) / 2
        assert set(cell["chance"]) == set(cell["correct"])  # every lp_offline task records its chance rate
        assert cell["seconds"]["total"] >= cell["seconds"]["build"] and cell["study_ppl"] is None

    text = doc.read_text()
    section = text.split("### The study's 25% column, re-read")[1]
    assert "## Fidelity" in text and f"#### {model}" in section
    assert "Cells re-read: 6 of 122 (the rest: run the command again" in section  # the tiny model's 6, and the suite study's 116 at 25%
    assert "| ShortGPT: BI against `ppl` | smollm2-135m | bi | ppl | — |" in section  # not measured yet
    assert "None of the 20 comparisons has both its cells measured yet" in section

    # a re-run computes nothing: every cell is cached
    monkeypatch.setattr(reread.lp, "heal", lambda *a, **k: pytest.fail("healed again"))
    monkeypatch.setattr(reread.study, "measure", lambda *a, **k: pytest.fail("measured again"))
    stamps = {path: path.stat().st_mtime_ns for path in reread.reread_dir(str(model), args).iterdir()}
    assert reread.main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in reread.reread_dir(str(model), args).iterdir()} == stamps

    # the cells are kept apart from the cache, with numbers only: the source's words (the original's
    # continuations) stay in the cache, and a later session with an empty cache measures nothing again
    kept = list((tmp_path / "results").rglob("*.json"))
    assert kept and "original-generation.json" not in {path.name for path in kept}
    assert not any("examples" in json.loads(path.read_text()).get("generation", {}) for path in kept)
    shutil.rmtree(tmp_path / "cache")
    assert reread.main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in reread.reread_dir(str(model), args).iterdir()} == stamps


def _cell(correct: dict, window_kl: list, window_agreed: list, agreed: list) -> dict:
    return {"correct": correct, "chance": {"t": 0.5},
            "fidelity": {"window_kl": window_kl, "window_agreed": window_agreed, "window_tokens": [10] * len(window_kl)},
            "generation": {"agreed": agreed}}


def test_comparisons_are_paired_differences_read_against_rp(reread) -> None:
    """Constructed cells: A and B answer the same examples (RP level), A is far closer to the
    original in KL on every window, B generates longer agreeing prefixes on every prompt."""
    base = {"correct": {"t": [1] * 60 + [0] * 40}}
    same = [1] * 50 + [0] * 50
    a = _cell({"t": same}, [1.0, 1.2, 0.9, 1.1] * 5, [8, 7, 8, 9] * 5, [1, 2, 1, 2] * 4)
    b = _cell({"t": same}, [3.0, 3.1, 2.9, 3.2] * 5, [4, 3, 4, 5] * 5, [9, 8, 9, 8] * 4)
    differences = reread.compare(base, a, b)
    assert differences["rp"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert differences["kl"]["mean"] == pytest.approx((sum(a["fidelity"]["window_kl"]) - sum(b["fidelity"]["window_kl"]))
                                                      / 200)
    assert differences["top1"]["mean"] == pytest.approx(0.4)  # (32 - 16) agreed of 40 tokens per 4 windows
    assert differences["generation"]["mean"] == pytest.approx(1.5 - 8.5)
    assert reread.reading(**differences["kl"], higher_is_better=False) == "A"
    assert reread.reading(**differences["generation"]) == "B"
    assert reread.reading(**differences["rp"]) == "level"
    opposite, sharper = reread.verdict_change(differences)
    assert opposite == [] and sharper == ["KL (A better)", "top-1 agreement (A better)",
                                          "generation agreement (B better)"]

    # RP separates the pair (A answers far more), KL reads it the other way round: a verdict it changes
    better = _cell({"t": [1] * 60 + [0] * 40}, b["fidelity"]["window_kl"], [4] * 20, [1] * 16)
    worse = _cell({"t": [1] * 20 + [0] * 80}, a["fidelity"]["window_kl"], [4] * 20, [1] * 16)
    opposite, sharper = reread.verdict_change(reread.compare(base, better, worse))
    assert reread.reading(**reread.compare(base, better, worse)["rp"]) == "A"
    assert opposite == ["KL"] and sharper == []
    paragraph = reread.claims_paragraph([f"X on m (a against b): {', '.join(opposite)} read it the other way"], [],
                                        pending=19, total=20)
    assert paragraph.startswith("1 of the 20 comparisons measured (19 wait for their cells).")
    assert "other way round from RP in: X on m" in paragraph


def test_claims_only_reads_just_the_compared_cells(reread) -> None:
    """--claims-only keeps, in the study's order, the asked cells that some comparison of the model reads."""
    args = reread.parse_args(["--claims-only", "--metrics", "bi,angular,taylor", "--heals", "none,lora,merge"])
    compared = {cell for _, model, first, second in reread.COMPARISONS if model == "gemma3-270m"
                for cell in (first, second)}
    chosen = reread.chosen_cells("gemma3-270m", args)
    assert chosen == [("bi", "none"), ("bi", "lora"), ("bi", "merge"), ("angular", "none")]
    assert set(chosen) <= compared and ("taylor", "none") not in chosen
    assert reread.chosen_cells("not-a-compared-model", args) == []
    every = reread.parse_args(["--metrics", "bi,angular", "--heals", "none,lora"])
    assert reread.chosen_cells("gemma3-270m", every) == [("bi", "none"), ("bi", "lora"), ("angular", "none"),
                                                          ("angular", "lora")]


@pytest.mark.parametrize("flag, value", [("--metrics", "bi,qlora"), ("--heals", "lora,"), ("--metrics", ",")])
def test_an_unknown_or_empty_metric_or_heal_exits_2(reread, capsys, flag, value) -> None:
    """A list split as every flag's is: an unknown name is refused with the choices, and an empty entry
    (which would silently run other cells than were typed) is refused too."""
    with pytest.raises(SystemExit) as exit_:
        reread.parse_args([flag, value])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and ("choose from" in message or "empty entry" in message)
