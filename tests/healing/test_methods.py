"""Each healing method on a tiny model: the loss falls, only the intended weights move, the export
reloads in plain transformers with identical logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.healing import heal
from layerprune.healing.replacement import block_io
from layerprune.models.loading import LoadedModel
from tests.healing.conftest import BLOCK, NUM_LAYERS, pruned_pair, training_rows
from tests.helpers import tiny_loaded

FAST_TRAINING = dict(steps=30, batch_size=4, lr=5e-3)
FAST = {**FAST_TRAINING, "train_layers": 2}  # partial-ft's own option; other methods refuse it
# what a reader of the model card must learn about each replacement kind
REPLACEMENT_NOTES = {"ffn": "attention output projection is zero", "layer": "initialised from the block's first layer"}


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Reference next-token loss, averaged over every position."""
    with torch.no_grad():
        logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("distill", [False, True])
def test_partial_ft_trains_only_head_and_last_layers(distill: bool) -> None:
    original, pruned = pruned_pair()
    data = training_rows()
    before = _snapshot(pruned.model)
    loss_before = _lm_loss(pruned.model, data.input_ids)
    healed = heal(pruned, "partial-ft", data, original=original, distill=distill, **FAST)
    assert healed is pruned
    assert _lm_loss(healed.model, data.input_ids) < loss_before - 0.05
    trained = {f"model.layers.{i}." for i in (NUM_LAYERS - 2 - 2, NUM_LAYERS - 2 - 1)} | {"lm_head."}
    changed = _changed(before, _snapshot(healed.model))
    assert changed == {k for k in before if k.startswith(tuple(trained))}
    entry = healed.lineage["healing"][-1]
    assert entry["method"] == "partial-ft"
    assert entry["trainable_parameters"] == sum(before[k].numel() for k in changed)
    assert entry["final_loss"] < entry["first_loss"]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the hooks are this test's probe
def test_partial_ft_backward_never_enters_the_frozen_prefix() -> None:
    """Backward stops at the first trained layer, even where the tied head shares the embeddings."""
    original, pruned = pruned_pair()
    pruned.model.config.tie_word_embeddings = True
    pruned.model.tie_weights()
    layers = pruned.adapter.decoder_layers(pruned.model)
    reached = []
    for index, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda *_args, index=index: reached.append(index))
    embedding = pruned.model.get_input_embeddings().weight
    before = embedding.detach().clone()
    heal(pruned, "partial-ft", training_rows(), original=original, **{**FAST, "steps": 2})
    assert reached and set(reached) == {len(layers) - 2, len(layers) - 1}
    assert not torch.equal(before, pruned.model.get_input_embeddings().weight)  # tied: the head's update shows


def test_lora_changes_only_target_projections_and_merges() -> None:
    original, pruned = pruned_pair()
    data = training_rows()
    before = _snapshot(pruned.model)
    loss_before = _lm_loss(pruned.model, data.input_ids)
    healed = heal(pruned, "lora", data, original=original, lora_rank=4, **FAST_TRAINING)
    assert type(healed.model).__name__ == "LlamaForCausalLM"
    after = _snapshot(healed.model)
    assert not any("lora" in k for k in after)
    targets = tuple(f".{t}.weight" for t in healed.adapter.lora_targets)
    assert _changed(before, after) == {k for k in before if k.endswith(targets)}
    assert _lm_loss(healed.model, data.input_ids) < loss_before - 0.05
    # rank r adds r * (fan_in + fan_out) per projection: q, o 32x32; k, v 32x16; gate, up, down 32x64
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert healed.lineage["healing"][-1]["trainable_parameters"] == (NUM_LAYERS - 2) * per_layer


def _block_mse(layer: torch.nn.Module, original: LoadedModel, data) -> float:
    entering, leaving, kwargs = block_io(original, *BLOCK, data.input_ids, data.attention_mask)
    with torch.no_grad():
        return (layer(entering, **kwargs) - leaving).pow(2).mean().item()


@pytest.mark.usefixtures("pair_cache")
def test_replacement_leaves_the_callers_original_untouched() -> None:
    """The result is cut from the original's weights: from a copy, so the caller's original model
    can serve the next pruned model (a study replaces block after block from one original)."""
    original, pruned = pruned_pair()
    before = _snapshot(original.model)
    healed = heal(pruned, "replace-layer", training_rows(), original=original, steps=3, batch_size=4)
    assert original.num_layers == NUM_LAYERS and "healing" not in original.lineage
    assert original.model is not healed.model and not _changed(before, _snapshot(original.model))
    assert set(before) == set(_snapshot(original.model))
    _, again = pruned_pair()
    assert heal(again, "replace-layer", training_rows(), original=original, steps=3, batch_size=4).num_layers == 5


@pytest.mark.usefixtures("pair_cache")
@pytest.mark.parametrize("kind", ["ffn", "layer"])
def test_replacement_trains_one_layer_and_keeps_the_rest(kind: str) -> None:
    original, pruned = pruned_pair()
    reference = tiny_loaded()
    data = training_rows()
    source = copy.deepcopy(reference.adapter.decoder_layers(reference.model)[BLOCK[0]])
    healed = heal(pruned, f"replace-{kind}", data, original=original, steps=40, batch_size=4, lr=1e-2)
    layers = healed.adapter.decoder_layers(healed.model)
    assert healed.num_layers == NUM_LAYERS - (BLOCK[1] - BLOCK[0]) + 1
    replacement = layers[BLOCK[0]]
    # every other layer is the original's, bit for bit
    reference_layers = reference.adapter.decoder_layers(reference.model)
    for new, old in zip([*range(BLOCK[0]), *range(BLOCK[0] + 1, healed.num_layers)],
                        [*range(BLOCK[0]), *range(BLOCK[1], NUM_LAYERS)]):
        assert not _changed(_snapshot(reference_layers[old]), _snapshot(layers[new]))
    changed = _changed(_snapshot(source), _snapshot(replacement))
    if kind == "ffn":
        assert changed == {"self_attn.o_proj.weight", *(k for k in changed if k.startswith(("mlp.", "post_")))}
        assert torch.count_nonzero(replacement.self_attn.o_proj.weight) == 0
        assert any(k.startswith("mlp.") for k in changed)
    else:
        assert any(k.startswith("self_attn.") for k in changed) and any(k.startswith("mlp.") for k in changed)
    assert _block_mse(replacement, reference, data) < _block_mse(source, reference, data)
    (block,) = healed.lineage["replaced_blocks"]
    assert {key: value for key, value in block.items() if key != "note"} == {"start": 2, "end": 4, "kind": kind}
    # the model card's explanation of what the replacement computes, for this kind
    assert REPLACEMENT_NOTES[kind] in block["note"]
    assert healed.lineage["removed_layers"] == [3]


@pytest.mark.usefixtures("pair_cache")
def test_ffn_replacement_is_exactly_a_pre_norm_mlp() -> None:
    original, pruned = pruned_pair()
    data = training_rows()
    healed = heal(pruned, "replace-ffn", data, original=original, steps=5, batch_size=4, lr=1e-2)
    layer = healed.adapter.decoder_layers(healed.model)[BLOCK[0]]
    entering, _, kwargs = block_io(tiny_loaded(), *BLOCK, data.input_ids[:4], data.attention_mask[:4])
    with torch.no_grad():
        expected = entering + layer.mlp(layer.post_attention_layernorm(entering))
        torch.testing.assert_close(layer(entering, **kwargs), expected, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("pair_cache")
@pytest.mark.parametrize("method", ["partial-ft", "lora", "replace-ffn", "replace-layer"])
def test_export_reloads_in_plain_transformers_with_identical_logits(method: str, tmp_path) -> None:
    original, pruned = pruned_pair()
    own = {"lora_rank": 4} if method == "lora" else {}
    healed = heal(pruned, method, training_rows(), original=original, steps=3, batch_size=4, lr=1e-2, **own)
    out = lp.save(healed, tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = training_rows(2, 12, seed=5).input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, healed.model(ids).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()
    assert f"Healed with `{method}`" in card
    if method == "replace-ffn":
        assert "attention contributes nothing" in card


@pytest.mark.usefixtures("pair_cache")
def test_replacement_of_an_unpruned_model_with_a_block(tmp_path) -> None:
    """The original model plus --block: the block is cut and replaced in one step."""
    loaded = tiny_loaded()
    healed = heal(loaded, "replace-layer", training_rows(), block=(1, 4), steps=3, batch_size=4)
    assert healed.num_layers == NUM_LAYERS - 2
    assert healed.lineage["removed_layers"] == [2, 3]
    assert healed.lineage["kept_layers"] == [0, 1, 4, 5]


@pytest.mark.usefixtures("pair_cache")
def test_other_removed_layers_stay_removed() -> None:
    pruned = tiny_loaded()
    lp.prune(pruned, [0, 2, 3])
    healed = heal(pruned, "replace-ffn", training_rows(), original=tiny_loaded(), steps=3, batch_size=4)
    assert healed.lineage["removed_layers"] == [0, 3]
    assert healed.lineage["kept_layers"] == [1, 2, 4, 5]
    assert healed.num_layers == 4
