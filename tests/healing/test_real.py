"""Healing on a real demo model: a few steps, then a plain transformers reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.healing import TrainingSet

TEXT = ("The river rises in the northern hills and flows south through farmland, past two market towns, "
        "before it reaches the sea at a wide estuary where ships once unloaded timber and grain. ") * 4


@pytest.mark.real
@pytest.mark.usefixtures("pair_cache")
def test_real_gemma3_replacement_exports_a_plain_checkpoint(gemma3_dir, tmp_path) -> None:
    """Gemma-3 mixes sliding and full attention: the replacement must keep its source layer's kind.
    (SmolLM2 is exercised end to end by benchmarks/bench_healing.py.)"""
    folder, block, method = gemma3_dir, (6, 9), "replace-ffn"
    original = lp.load_model(folder)
    num_layers, types = original.num_layers, getattr(original.model.config, "layer_types", None)
    ids = original.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :96].view(3, 32)
    pruned = lp.load_model(folder)
    lp.prune(pruned, range(*block))
    healed = lp.heal(pruned, method, TrainingSet.from_ids(ids), original=original, steps=3, batch_size=3)
    assert healed.num_layers == num_layers - (block[1] - block[0]) + 1
    if types:
        assert healed.model.config.layer_types == types[:block[0] + 1] + types[block[1]:]
    out = lp.save(healed, tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, healed.model(ids).logits, rtol=1e-5, atol=1e-5)
