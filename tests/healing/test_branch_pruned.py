"""Healing a model that removed single attention and MLP branches: the training methods train it and
its export keeps its form (transformers repack, decilm); the methods that rebuild the cut from the
original's whole layers refuse it rather than silently put the removed branches back."""

from __future__ import annotations

import json

import pytest
import torch

import layerprune as lp
from layerprune.healing import HEALERS, heal
from layerprune.models.sublayers import present_branches
from tests.core.test_decilm import _llama
from tests.healing.conftest import training_rows
from tests.helpers import tiny_loaded

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


@pytest.mark.parametrize("method", [name for name, healer in HEALERS.registered() if healer.rebuilds_from_original])
def test_a_method_that_rebuilds_from_the_original_refuses_a_branch_cut(method: str) -> None:
    with pytest.raises(lp.UsageError, match="put back the attention and MLP branches.*heal it with lora"):
        heal(branch_pruned(tiny_loaded), method, training_rows(), original=tiny_loaded(), steps=1, batch_size=4)
