"""Prune the real SmolLM2-135M and Gemma-3-270M, export, and reload with plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.models.surgery import remove_layers

pytestmark = pytest.mark.real

PROMPT = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published"

PLAIN_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_file, out_file = sys.argv[1:4]
    assert "layerprune" not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    AutoTokenizer.from_pretrained(folder)
    ids = torch.load(ids_file)
    with torch.no_grad():
        torch.save(model(ids).logits, out_file)
    print(model.config.num_hidden_layers, getattr(model.config, "layer_types", None))
    """
)


def _reload_in_fresh_process(folder: Path, ids: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, str]:
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_RELOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, check=True,
    )
    return torch.load(tmp_path / "logits.pt"), result.stdout


def _prune_save_reload(model_dir: Path, layers: list[int], tmp_path: Path) -> tuple[lp.LoadedModel, Path, str]:
    loaded = lp.load_model(model_dir)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    lp.prune(loaded, layers)
    out = lp.save(loaded, tmp_path / "pruned")
    with torch.no_grad():
        expected = loaded.model(ids).logits
    actual, stdout = _reload_in_fresh_process(out, ids, tmp_path)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-5)
    return loaded, out, stdout


def test_smollm2_prune_save_reload(smollm2_dir: Path, tmp_path: Path) -> None:
    loaded, out, stdout = _prune_save_reload(smollm2_dir, [25, 26, 27], tmp_path)
    assert stdout.split()[0] == "27"
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_layers"] == [25, 26, 27]
    assert record["original_num_layers"] == 30
    assert record["parameters"] < record["original_parameters"]
    assert not (smollm2_dir / "layerprune.json").exists(), "the source model must never be written to"


def test_gemma3_prune_keeps_each_layers_attention_type(gemma3_dir: Path, tmp_path: Path) -> None:
    original_types = json.loads((gemma3_dir / "config.json").read_text())["layer_types"]
    full = [i for i, kind in enumerate(original_types) if kind == "full_attention"]
    removed = [full[0], full[0] + 1, 16]  # a full-attention layer, the sliding one after it, and one near the end
    loaded, out, _ = _prune_save_reload(gemma3_dir, removed, tmp_path)
    expected_types = [kind for i, kind in enumerate(original_types) if i not in removed]
    saved_types = json.loads((out / "config.json").read_text())["layer_types"]
    assert saved_types == expected_types
    layers = loaded.adapter.decoder_layers(loaded.model)
    assert [layer.self_attn.layer_type for layer in layers] == expected_types


def test_gemma3_pruned_generation_with_cache_matches_without(gemma3_dir: Path) -> None:
    loaded = lp.load_model(gemma3_dir)
    remove_layers(loaded.model, [5, 9])
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        cached = loaded.model.generate(ids, use_cache=True, **common)
        uncached = loaded.model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached, uncached)


def test_gguf_input_exports_a_plain_checkpoint(smollm2_gguf: Path, tmp_path: Path) -> None:
    loaded, out, stdout = _prune_save_reload(smollm2_gguf, [0, 29], tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config, "a de-quantized GGUF model must export as a plain float checkpoint"
    assert config["num_hidden_layers"] == 28
    assert json.loads((out / "layerprune.json").read_text())["source_model"] == str(smollm2_gguf)
