"""evaluate() and `layerprune eval` end to end on tiny checkpoints, and the Markdown helpers."""

from __future__ import annotations

import copy
import json

import pytest

import layerprune as lp
from layerprune.cli.main import main
from layerprune.reporting.eval_tables import comparison_table, update_doc_section
from tests.helpers import tiny_loaded


def test_evaluate_compares_models_with_the_reference(fake_data_layer) -> None:
    loaded = tiny_loaded(num_layers=4)
    pruned = copy.deepcopy(loaded)
    lp.prune(pruned, [2, 3])
    pruned.source = "pruned"
    report = lp.evaluate(loaded, compare=[loaded, pruned], ppl=[str(fake_data_layer)], seq_len=32,
                         tasks=["lp_sentiment_rt"])
    assert list(report["models"]) == [loaded.source, loaded.source + "'", "pruned"]
    reference, itself, cut = report["models"].values()
    reference_ppl = reference["perplexity"][str(fake_data_layer)]
    assert set(reference_ppl) == {"ppl", "nll", "tokens", "ci95"}
    assert reference_ppl["ci95"][0] <= reference_ppl["ppl"] <= reference_ppl["ci95"][1]
    assert itself["perplexity"] == reference["perplexity"]
    assert cut["perplexity"] != reference["perplexity"]
    assert itself["stability"] == {"lp_sentiment_rt": 1.0}
    task = reference["tasks"]["lp_sentiment_rt"]
    right = reference["correct"]["lp_sentiment_rt"]
    assert (task["available"], task["evaluated"], len(right)) == (10, 10, 10)
    assert task["acc"] == pytest.approx(sum(right) / 10)
    assert task["stderr"] == pytest.approx((task["acc"] * (1 - task["acc"]) / 9) ** 0.5)
    assert itself["retained"]["mean"] == 1.0 and itself["retained"]["ci95"] == [1.0, 1.0]
    ratio = sum(cut["correct"]["lp_sentiment_rt"]) / sum(right)
    assert cut["retained"]["mean"] == pytest.approx(ratio)
    assert cut["retained"]["ci95"][0] <= ratio <= cut["retained"]["ci95"][1]
    assert cut["num_layers"] == 2 and cut["removed_layers"] == [2, 3]
    table = comparison_table(report)
    assert "| layers | 4 |" in table and "| 2 | -2 |" in table


def test_cli_writes_json_markdown_and_plot(fake_data_layer, tmp_path, capsys) -> None:
    original = tiny_loaded(num_layers=3)
    lp.save(original, tmp_path / "original")
    lp.prune(original, [1])
    lp.save(original, tmp_path / "pruned")
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tmp_path / "original"), "--compare", str(tmp_path / "pruned"),
            "--ppl", str(fake_data_layer), "--seq-len", "16", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for result in report["models"].values():
        values = result["perplexity"][str(fake_data_layer)]
        assert values["tokens"] > 0 and values["ppl"] == pytest.approx(2.718281828 ** values["nll"])
    assert "Δ" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_cli_bad_input_fails_in_one_line_before_loading(tmp_path, capsys) -> None:
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--model", str(tmp_path / "missing"), "--ppl", "wiki-sample", "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--classify", "r8", "--output", out]) == 2
    assert "--k" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_update_doc_section_keeps_other_sections(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Healing\n\nhealing table\n\n## Evaluation\n\n### Efficiency\n\nold\n\n"
                   "### Other\n\nkept\n\n## Scoring\n\nscores\n")
    update_doc_section(doc, "## Evaluation", "### Efficiency", "new")
    update_doc_section(doc, "## Evaluation", "### Classification", "curve")
    text = doc.read_text()
    assert "old" not in text and "new" in text
    for kept in ("healing table", "### Other\n\nkept", "## Scoring\n\nscores", "curve"):
        assert kept in text
    assert text.index("curve") < text.index("## Scoring")
    update_doc_section(doc, "## Evaluation", "### Efficiency", "new")  # a rewrite with the same body
    assert doc.read_text() == text  # changes nothing, not even the blank lines under a heading
