"""Layer surgery on tiny random models of every supported family."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.models.architectures import adapter_for
from layerprune.models.editing import prune, replace
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import parse_layer_list, remove_layers, replace_block, validate_layer_indices
from layerprune.models.tiny import byte_tokenizer, tiny_config, tiny_model
from tests.conftest import FAMILIES
from tests.helpers import skipping_layers

NUM_LAYERS = 6
REMOVALS = {"start": [0, 1], "middle": [2, 3], "end": [4, 5], "scattered": [0, 3, 5]}


def _input_ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 12), generator=generator)


@pytest.mark.parametrize("where", sorted(REMOVALS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_skipping_the_layers(family: str, where: str) -> None:
    original = tiny_model(family, NUM_LAYERS)
    ids = _input_ids()
    with torch.no_grad(), skipping_layers(adapter_for(original).decoder_layers(original), REMOVALS[where]):
        expected = original(ids).logits
    pruned = copy.deepcopy(original)
    removed = remove_layers(pruned, REMOVALS[where])
    assert removed == sorted(REMOVALS[where])
    assert pruned.config.num_hidden_layers == NUM_LAYERS - len(removed)
    assert adapter_for(pruned).num_layers(pruned) == NUM_LAYERS - len(removed)
    with torch.no_grad():
        actual = pruned(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # sanity: skipping really changed the output, so the comparison above has teeth
    with torch.no_grad():
        assert not torch.allclose(original(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_indices_are_renumbered(family: str) -> None:
    model = tiny_model(family, NUM_LAYERS)
    remove_layers(model, [1, 4])
    for new_index, layer in enumerate(adapter_for(model).decoder_layers(model)):
        indices = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert indices == {new_index}


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without_cache(family: str) -> None:
    model = tiny_model(family, NUM_LAYERS)
    remove_layers(model, [1, 2])
    ids = _input_ids()[:1]
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=256, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **common)
        uncached = model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == ids.shape[1] + 10


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_plain_reload_gives_identical_logits(family: str, tmp_path) -> None:
    loaded = LoadedModel(tiny_model(family, NUM_LAYERS), byte_tokenizer(), f"tiny-{family}", None)  # type: ignore[arg-type]
    loaded.adapter = adapter_for(loaded.model)
    lp.prune(loaded, [0, 4])
    out = lp.save(loaded, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation=loaded.model.config._attn_implementation
    )
    ids = _input_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_layers"] == [0, 4]
    assert record["kept_layers"] == [1, 2, 3, 5]
    assert "[0, 4]" in (out / "README.md").read_text()


def test_gemma3_layer_types_follow_their_layers() -> None:
    model = tiny_model("gemma3", NUM_LAYERS)
    types = list(model.config.layer_types)
    assert types[2] == "full_attention"
    remove_layers(model, [2, 4])
    assert model.config.layer_types == [types[i] for i in (0, 1, 3, 5)]
    for layer, kind in zip(adapter_for(model).decoder_layers(model), model.config.layer_types):
        assert layer.self_attn.layer_type == kind
        assert layer.self_attn.is_sliding == (kind == "sliding_attention")


def test_pruning_a_pruned_model_records_original_indices(tmp_path) -> None:
    loaded = LoadedModel(tiny_model("llama", NUM_LAYERS), byte_tokenizer(), "tiny", None)  # type: ignore[arg-type]
    loaded.adapter = adapter_for(loaded.model)
    lp.prune(loaded, [1])
    first = lp.save(loaded, tmp_path / "once")
    again = lp.load_model(first)
    lp.prune(again, [1])  # index 1 of the pruned model is original layer 2
    record = json.loads((lp.save(again, tmp_path / "twice") / "layerprune.json").read_text())
    assert record["removed_layers"] == [1, 2]
    assert record["kept_layers"] == [0, 3, 4, 5]
    assert record["source_model"] == "tiny"


@pytest.mark.parametrize("share_weights", [False, True])
def test_a_pruned_copy_leaves_the_model_whole(share_weights: bool) -> None:
    loaded = LoadedModel(tiny_model("llama", NUM_LAYERS), byte_tokenizer(), "tiny", None)  # type: ignore[arg-type]
    loaded.adapter = adapter_for(loaded.model)
    before = loaded.model(_input_ids()).logits
    pruned = loaded.copy(share_weights=share_weights)
    lp.prune(pruned, [1, 2])
    assert (loaded.num_layers, pruned.num_layers) == (NUM_LAYERS, NUM_LAYERS - 2)
    assert "removed_layers" not in loaded.lineage and pruned.lineage["removed_layers"] == [1, 2]
    torch.testing.assert_close(loaded.model(_input_ids()).logits, before, rtol=0, atol=0)
    shared = pruned.model.lm_head.weight.data_ptr() == loaded.model.lm_head.weight.data_ptr()
    assert shared == share_weights


def test_replace_block_installs_one_layer_and_cuts_config() -> None:
    model = tiny_model("gemma3", NUM_LAYERS)
    layers = adapter_for(model).decoder_layers(model)
    replacement = layers[2]
    types = list(model.config.layer_types)
    replace_block(model, 1, 4, replacement, source_index=2)
    assert adapter_for(model).num_layers(model) == 4
    assert model.config.layer_types == [types[0], types[2], types[4], types[5]]
    assert replacement.self_attn.layer_idx == 1


def test_gpt2_scaling_attention_by_layer_index_is_refused() -> None:
    model = tiny_model("gpt2", NUM_LAYERS)
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UsageError, match="GPT-2 checkpoint scales attention by its layer index"):
        remove_layers(model, [1])
    assert adapter_for(model).num_layers(model) == NUM_LAYERS


def test_the_sliding_layer_flag_follows_the_cut_layer_types() -> None:
    """Qwen2 decides once, at init, whether any layer slides; cutting the only sliding layer must say so."""
    config = tiny_config("qwen2", 4)
    config.layer_types = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    assert model.model.has_sliding_layers
    remove_layers(model, [2])
    assert model.model.has_sliding_layers
    remove_layers(model, [0])
    assert not model.model.has_sliding_layers


@pytest.mark.parametrize(
    ("indices", "message"),
    [([], "no layers"), ([-1], ">= 0"), ([6], "out of range"), ([1, 1], "more than once"),
     (list(range(6)), "cannot remove all")],
)
def test_bad_indices_are_refused(indices: list[int], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        validate_layer_indices(indices, 6)


def test_parse_layer_list() -> None:
    assert parse_layer_list("3, 5,10-12") == [3, 5, 10, 11, 12]
    assert parse_layer_list("-1") == [-1]
    assert parse_layer_list(" 7 ") == [7]
    assert parse_layer_list(" , ") == []
    for text in ("1,,2", "1,2,", "+3", "\uff13", "1-\u0663", "1.0", "0x3", "1_0"):
        with pytest.raises(UsageError, match="cannot read"):
            parse_layer_list(text)
    with pytest.raises(UsageError, match="cannot read"):
        parse_layer_list("a,b")
    with pytest.raises(UsageError, match="backwards"):
        parse_layer_list("5-3")


def test_unknown_encoder_only_architecture_is_refused(tmp_path) -> None:
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="not a causal"):
        lp.load_model(tmp_path)


def test_cli_module_runs_as_script() -> None:
    result = subprocess.run([sys.executable, "-m", "layerprune.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "prune" in result.stdout


@pytest.mark.parametrize("edit", ["prune", "replace"])
def test_a_model_healed_under_fsdp_is_not_edited_in_place(edit: str) -> None:
    """Its saved weights are the gathered ``export_state``: an in-place cut would not reach them."""
    loaded = LoadedModel(tiny_model("llama", NUM_LAYERS), byte_tokenizer(), "tiny", None)  # type: ignore[arg-type]
    loaded.adapter = adapter_for(loaded.model)
    loaded.export_state = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    with pytest.raises(UsageError, match="healed under FSDP.*load the saved model"):
        if edit == "prune":
            prune(loaded, [1])
        else:
            replace(loaded, 1, 3, torch.nn.Identity(), "identity")
    assert loaded.num_layers == NUM_LAYERS
