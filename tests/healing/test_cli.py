"""``layerprune heal`` end to end on tiny checkpoints on disk, with Alpaca-style instruction data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.cli.main import main
from tests.helpers import tiny_loaded

ALPACA = [{"instruction": f"Repeat the word number {i}.", "input": "" if i % 2 else "word", "output": f"word {i}"}
          for i in range(16)]


@pytest.fixture
def pruned_dir(tmp_path):
    original = tmp_path / "original"  # a plain checkpoint: the pruned model's lineage then names this folder
    loaded = tiny_loaded()
    loaded.model.save_pretrained(original)
    loaded.tokenizer.save_pretrained(original)
    assert main(["prune", "--model", str(original), "--layers", "2-3", "--out", str(tmp_path / "pruned")]) == 0
    return tmp_path / "pruned"


@pytest.fixture
def alpaca(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in ALPACA))
    return path


@pytest.mark.usefixtures("pair_cache")
def test_heal_cli_reads_the_block_from_lineage_and_exports(pruned_dir, alpaca, tmp_path, capsys) -> None:
    out = tmp_path / "healed"
    argv = ["heal", "--model", str(pruned_dir), "--method", "replace-ffn", "--data", str(alpaca), "--steps", "4",
            "--batch-size", "4", "--seq-len", "256", "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "healed with replace-ffn" in capsys.readouterr().out
    record = json.loads((out / "layerprune.json").read_text())
    assert record["replaced_blocks"][0]["start"] == 2 and record["replaced_blocks"][0]["end"] == 4
    assert record["healing"][0]["method"] == "replace-ffn"
    assert not (tmp_path / "healed.heal-checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    assert torch.count_nonzero(model.model.layers[2].self_attn.o_proj.weight) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--method", "qlora"], "qlora needs"),
     (["--method", "partial-ft", "--resume"], "does not exist"),
     (["--method", "replace-layer", "--block", "3"], "at least two consecutive"),
     (["--method", "lora", "--steps", "0"], "steps must be at least 1")],
)
def test_heal_cli_refuses_bad_input_in_one_line(pruned_dir, alpaca, tmp_path, capsys, extra, message) -> None:
    if "qlora" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["heal", "--model", str(pruned_dir), "--data", str(alpaca), "--out", str(tmp_path / "x"), *extra])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()
