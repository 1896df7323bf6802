"""``layerprune heal --method replace-linear|rescale|merge`` and ``prune --compensate`` end to end on
tiny checkpoints; every refusal is exit 2, one line naming the reason, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.cli.main import main
from layerprune.data import build_calibration
from layerprune.models.loading import load_model
from layerprune.repair import compensate
from tests.helpers import save_tiny_checkpoint, write_corpus


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def original(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "original", "llama")


def pruned(original: Path, layers: str, tmp_path: Path) -> Path:
    out = tmp_path / f"pruned-{layers}"
    assert main(["prune", "--model", str(original), "--layers", layers, "--out", str(out)]) == 0
    return out


CALIBRATION = ["--sampling", "contiguous", "--samples", "8", "--seq-len", "64"]


@pytest.mark.parametrize("method", ["replace-linear", "rescale", "merge"])
def test_heal_repairs_the_cut_named_by_the_lineage_like_the_api(method, original, corpus, tmp_path, capsys) -> None:
    out = tmp_path / "repaired"
    argv = ["heal", "--model", str(pruned(original, "2-3", tmp_path)), "--method", method, "--data", str(corpus),
            *CALIBRATION, "--out", str(out)]
    assert main(argv) == 0
    assert f"repaired with {method}" in capsys.readouterr().out
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_layers"] == [2, 3] and record["healing"][0]["method"] == method
    # nothing was trained: no schedule is recorded, as prune --compensate records none
    assert "steps" not in record["healing"][0] and "lr" not in record["healing"][0]
    assert record["healing"][0]["trainable_parameters"] == 0
    (repair,) = record["repairs"]
    assert repair["method"] == method and [(r["start"], r["end"]) for r in repair["runs"]] == [(2, 4)]
    if method != "merge":  # the first 8 non-overlapping 64-token windows of the file: 512 tokens
        assert repair["data"]["tokens"] == 512 and repair["runs"][0]["tokens"] == 512
    reference = load_model(str(original))
    rows = build_calibration(reference.tokenizer, str(corpus), samples=8, seq_len=64, sampling="contiguous")
    compensate(reference, [2, 3], method, rows)
    probe = rows.input_ids[:2, :20]
    with torch.no_grad():
        saved = AutoModelForCausalLM.from_pretrained(out)(input_ids=probe).logits
        expected = reference.model(input_ids=probe).logits
    torch.testing.assert_close(saved, expected, rtol=1e-5, atol=1e-5)
    assert saved.shape[-1] == reference.model.config.vocab_size
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) == record["parameters"]
    assert record["parameters"] == json.loads((tmp_path / "pruned-2-3" / "layerprune.json").read_text())["parameters"]


def test_heal_repair_reads_the_calibration_default_not_steps_times_batch(original, corpus, tmp_path) -> None:
    """Without --samples a repair reads 64 windows (as score and prune --compensate calibrate), not
    the 100 steps x 8 rows a trained method would draw; --samples still sets the count."""
    model = pruned(original, "2-3", tmp_path)
    for samples, expected in ((None, 64), (12, 12)):
        out = tmp_path / f"repaired-{samples}"
        count = [] if samples is None else ["--samples", str(samples)]
        assert main(["heal", "--model", str(model), "--method", "rescale", "--data", str(corpus), "--sampling",
                     "contiguous", "--seq-len", "16", *count, "--out", str(out)]) == 0
        (repair,) = json.loads((out / "layerprune.json").read_text())["repairs"]
        assert repair["data"]["tokens"] == expected * 16


def test_heal_cuts_and_repairs_an_unpruned_model_with_block(original, corpus, tmp_path) -> None:
    out = tmp_path / "repaired"
    assert main(["heal", "--model", str(original), "--method", "rescale", "--block", "3-4", "--data", str(corpus),
                 *CALIBRATION, "--out", str(out)]) == 0
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_layers"] == [3, 4] and record["repairs"][0]["runs"][0]["s"] > 0


def test_prune_compensate_records_the_repair(original, corpus, tmp_path, capsys) -> None:
    out = tmp_path / "pc"
    assert main(["prune", "--model", str(original), "--metric", "bi", "--remove", "2", "--iterative",
                 "--compensate", "rescale", "--data", str(corpus), "--samples", "8", "--seq-len", "64",
                 "--out", str(out)]) == 0
    record = json.loads((out / "layerprune.json").read_text())
    steps = record["recipe"]["selection"]["steps"]
    assert len(record["repairs"]) == 2 and len(steps) == 2  # one repair per step, each re-scored after it
    assert sorted(step["removed"] for step in steps) == record["removed_layers"]
    assert "Healed with `rescale`" in (out / "README.md").read_text()
    named = tmp_path / "named"
    assert main(["prune", "--model", str(original), "--layers", "2-3", "--compensate", "replace-linear",
                 "--ridge", "0.01", "--data", str(corpus), "--samples", "8", "--seq-len", "64",
                 "--out", str(named)]) == 0
    (repair,) = json.loads((named / "layerprune.json").read_text())["repairs"]
    assert repair["options"]["ridge"] == 0.01
    assert repair["method"] == "replace-linear" and repair["batch_size"] == 8  # the RepairConfig, as run
    line = capsys.readouterr().out.strip().splitlines()[-1]  # its one line says the repair happened
    assert f"layers; repaired with replace-linear (training-free: " in line and line.endswith(f"saved to {named}")
    card = (named / "README.md").read_text()  # the card's snippet opens this folder, not a placeholder
    assert f"AutoModelForCausalLM.from_pretrained({str(named)!r})" in card and '"PATH"' not in card


def post_norm_checkpoint(tmp_path: Path) -> Path:
    """A tiny OPT that normalises after each residual addition, like OPT-350m."""
    return save_tiny_checkpoint(tmp_path / "opt-post-norm", "opt_post_norm")


@pytest.mark.parametrize(
    ("case", "message"),
    [("layer-0", "starts at layer 0"),
     ("singular", "is singular"),
     ("few-tokens", "fewer than the hidden size 32"),
     ("post-norm", "do_layer_norm_before=False"),
     ("no-lineage", "records no removed layers")],
)
def test_heal_refuses_bad_input_in_one_line(case, message, original, corpus, tmp_path, capsys) -> None:
    method, source, layers, calibration = "replace-linear", original, "2-3", CALIBRATION
    if case == "layer-0":
        layers = "0-1"
    elif case == "singular":  # one repeated byte: every position's hidden state is the same, MᵀM has rank 1
        (tmp_path / "same.txt").write_text("a" * 2000)
        corpus = tmp_path / "same.txt"
    elif case == "few-tokens":
        calibration = ["--sampling", "contiguous", "--samples", "1", "--batch-size", "1", "--seq-len", "16"]
    elif case == "post-norm":
        method, source = "rescale", post_norm_checkpoint(tmp_path)
    model = original if case == "no-lineage" else pruned(source, layers, tmp_path)
    capsys.readouterr()
    code = main(["heal", "--model", str(model), "--method", method, "--data", str(corpus), *calibration,
                 "--out", str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_prune_compensate_refuses_before_writing(original, corpus, tmp_path, capsys) -> None:
    code = main(["prune", "--model", str(original), "--layers", "0-1", "--compensate", "merge", "--out",
                 str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "starts at layer 0" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert lp.info(load_model(str(original)))["num_layers"] == 6
