"""Healing a model that removed single attention and MLP branches: every method heals it and keeps the
branches removed. The training methods train it as it is; the methods that rebuild the result from the
original (the training-free repairs, the replacements) cut the removed branches from the original again.
The export after healing keeps its form (transformers repack, decilm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.cli.main import main
from layerprune.healing import heal
from layerprune.models.sublayers import RemovedAttention, present_branches
from layerprune.repair import REPAIRS, compensate
from tests.core.test_decilm import _llama
from tests.healing.conftest import training_rows
from tests.helpers import save_tiny_checkpoint, tiny_loaded, write_corpus

CUT = dict(layers=[3], attention=[1, 2], mlp=[4])
"""A whole layer, two attentions and an MLP: 5 layers left, 2 without attention, 1 without MLP."""
TRAINING = ["lora", "partial-ft"]  # qlora needs a CUDA GPU (bitsandbytes)


def branch_pruned(family_model) -> lp.LoadedModel:
    pruned = family_model()
    lp.prune(pruned, CUT["layers"], attention=CUT["attention"], mlp=CUT["mlp"])
    return pruned


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(training_rows(2, 12, seed=5).input_ids).logits


@pytest.mark.parametrize("export", ["transformers", "decilm"])
@pytest.mark.parametrize("method", TRAINING)
def test_a_healed_branch_pruned_model_reloads_in_its_form_with_the_same_logits(method: str, export: str,
                                                                                 tmp_path) -> None:
    pruned = branch_pruned(_llama)  # MLP width 256: decilm's ffn_mult can say it
    before = {k: v.clone() for k, v in pruned.model.state_dict().items()}
    own = {"lora_rank": 4} if method == "lora" else {"train_layers": 2}
    healed = heal(pruned, method, training_rows(), original=_llama(), steps=3, batch_size=4, lr=1e-2, **own)
    after = healed.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # it trained
    assert present_branches(healed.model, healed.adapter) == [(True, True), (False, True), (False, True),
                                                              (True, False), (True, True)]
    out = lp.save(healed, tmp_path / "healed", format=export)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == (["DeciLMForCausalLM"] if export == "decilm" else ["LlamaForCausalLM"])
    reloaded = lp.load_model(out)
    # the healed model's own attention kernel: another kernel rounds differently
    reloaded.model.set_attn_implementation(healed.model.config._attn_implementation)
    torch.testing.assert_close(logits(reloaded.model), logits(healed.model), rtol=0, atol=0)
    record = json.loads((out / "layerprune.json").read_text())
    assert record["healing"] and record["removed_layers"] == CUT["layers"]


@pytest.mark.parametrize("method", [name for name, repair in REPAIRS.registered() if repair.branch_cuts])
def test_a_training_free_repair_heals_a_branch_cut_as_compensate_cuts_and_repairs_the_original(method: str) -> None:
    rows = training_rows()
    healed = heal(branch_pruned(tiny_loaded), method, rows, original=tiny_loaded(), batch_size=4)
    reference = tiny_loaded()  # the cut named by hand, not read from a lineage
    compensate(reference, CUT["layers"], method, rows, batch_size=4, attention=CUT["attention"], mlp=CUT["mlp"])
    assert healed.model.state_dict().keys() == reference.model.state_dict().keys()
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(healed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert healed.lineage["branches"] == reference.lineage["branches"]
    assert (healed.lineage["removed_attention"], healed.lineage["removed_mlp"]) == (CUT["attention"], CUT["mlp"])
    assert healed.lineage["healing"][0]["method"] == method and healed.lineage["repairs"][0]["method"] == method


def test_heal_merge_refuses_a_branch_cut_with_the_repairs_reason_and_writes_nothing(tmp_path: Path, capsys) -> None:
    original = save_tiny_checkpoint(tmp_path / "original")
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(original), "--attention", "2", "--layers", "4", "--out", str(pruned)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["heal", "--model", str(pruned), "--method", "merge", "--data", str(write_corpus(tmp_path / "c.txt")),
                 "--out", str(out)]) == 2
    assert "merge repairs a cut of whole layers only" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("pair_cache")
@pytest.mark.parametrize("export", ["transformers", "decilm"])
def test_a_replacement_keeps_the_removed_branches_and_reloads_with_the_same_logits(export: str, tmp_path) -> None:
    pruned = _llama()
    lp.prune(pruned, [3, 4], attention=[1])
    healed = heal(pruned, "replace-layer", training_rows(), original=_llama(), steps=3, batch_size=4, lr=1e-2)
    layers = healed.adapter.decoder_layers(healed.model)
    assert isinstance(layers[1].self_attn, RemovedAttention)
    assert present_branches(healed.model, healed.adapter) == [(True, True), (False, True), (True, True),
                                                              (True, True), (True, True)]
    assert (healed.lineage["removed_attention"], healed.lineage["removed_layers"]) == ([1], [4])
    assert healed.lineage["replaced_blocks"][0] | {"note": ""} == {"start": 3, "end": 5, "kind": "layer", "note": ""}
    original = _llama()
    kept = original.adapter.decoder_layers(original.model)
    for index, source in ((0, 0), (2, 2), (4, 5)):  # untouched original layers around the block
        for name, tensor in kept[source].state_dict().items():
            torch.testing.assert_close(layers[index].state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(layers[1].mlp.down_proj.weight, kept[1].mlp.down_proj.weight, rtol=0, atol=0)
    # the block's trained module in place of layer 3, no longer the copy it started from
    assert not torch.equal(layers[3].self_attn.q_proj.weight, kept[3].self_attn.q_proj.weight)
    out = lp.save(healed, tmp_path / "healed", format=export)
    reloaded = lp.load_model(out)
    reloaded.model.set_attn_implementation(healed.model.config._attn_implementation)
    torch.testing.assert_close(logits(reloaded.model), logits(healed.model), rtol=0, atol=0)
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_attention"] == [1] and record["replaced_blocks"][0]["start"] == 3


def test_a_replacement_block_over_a_removed_branch_is_refused() -> None:
    pruned = tiny_loaded()
    lp.prune(pruned, [3, 4], attention=[1])
    with pytest.raises(lp.UsageError, match="1-2 is not a run of removed whole layers.*removed: 3-4"):
        heal(pruned, "replace-layer", training_rows(), original=tiny_loaded(), block=(1, 3), steps=1, batch_size=4)


def test_heal_rescale_of_a_branch_only_cut_rebuilds_from_the_lineages_original(tmp_path: Path) -> None:
    """No whole layer removed and no --original: the source model is loaded, not the pruned one taken for it."""
    original = save_tiny_checkpoint(tmp_path / "original")
    corpus = write_corpus(tmp_path / "corpus.txt")
    pruned, out = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", "--model", str(original), "--attention", "1", "--mlp", "3", "--out", str(pruned)]) == 0
    calibration = ["--sampling", "contiguous", "--samples", "8", "--seq-len", "64"]
    assert main(["heal", "--model", str(pruned), "--method", "rescale", "--data", str(corpus), *calibration,
                 "--out", str(out)]) == 0
    reference = lp.load_model(str(original))
    rows = lp.build_calibration(reference.tokenizer, str(corpus), split="train", samples=8, seq_len=64,
                                sampling="contiguous")
    compensate(reference, [], "rescale", rows, attention=[1], mlp=[3])
    torch.testing.assert_close(logits(lp.load_model(str(out)).model), logits(reference.model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["replace-linear", "rescale"])
def test_a_repair_heals_a_scattered_whole_layer_cut_as_compensate_does_on_the_original(method: str) -> None:
    """Layers 1, 4 and 5 of 6 removed: the lineage names original layers the pruned model no longer has
    at those indices, so the cut is checked and repaired on the original, never indexed on the pruned model."""
    rows = training_rows()
    pruned = tiny_loaded()
    lp.prune(pruned, [1, 4, 5])
    healed = heal(pruned, method, rows, original=tiny_loaded(), batch_size=4)
    reference = tiny_loaded()
    compensate(reference, [1, 4, 5], method, rows, batch_size=4)
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(healed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert healed.lineage["removed_layers"] == [1, 4, 5]
