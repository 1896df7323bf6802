"""Sub-layer surgery: removing a layer's attention or its MLP, in memory and in the exported checkpoint,
on tiny random models of every family whose branches can be told apart."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.models.editing import export_form
from layerprune.models.sublayers import TokenCount, present_branches, repack_plan
from tests.conftest import FAMILIES
from tests.helpers import record_text, tiny_loaded, zeroing_branches

NUM_LAYERS = 6
SUBLAYER_FAMILIES = [f for f in FAMILIES if f != "opt_post_norm"]  # post-norm: refused (test below)
CUTS = {  # (whole layers, attention, MLP)
    "attention at the start": ([], [0, 2], []),
    "mlp at the end": ([], [], [4, 5]),
    "both, one layer emptied": ([], [1, 3], [3, 4]),
    "with whole layers": ([5], [0], [2]),
}


def _ids(seed: int = 0, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (rows, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("family", SUBLAYER_FAMILIES)
def test_branch_cut_equals_zeroing_the_branch_outputs(family: str, cut: str) -> None:
    layers, attention, mlp = CUTS[cut]
    loaded = tiny_loaded(family, NUM_LAYERS)
    reference = copy.deepcopy(loaded.model)
    whole_layers = set(layers) | (set(attention) & set(mlp))
    with torch.no_grad(), zeroing_branches(reference, [*attention, *layers], [*mlp, *layers]):
        expected = reference(_ids()).logits
    parameters = sum(p.numel() for p in loaded.model.parameters())
    removed = lp.prune(loaded, layers, attention=attention, mlp=mlp)
    assert removed == sorted(whole_layers)
    assert loaded.num_layers == NUM_LAYERS - len(whole_layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(reference(_ids()).logits, expected, atol=1e-4)  # the cut changes the output
    assert sum(p.numel() for p in loaded.model.parameters()) < parameters  # the removed branches' weights are gone


@pytest.mark.parametrize("family", SUBLAYER_FAMILIES)
def test_generate_with_cache_equals_without_and_removed_attention_keeps_no_keys(family: str) -> None:
    loaded = tiny_loaded(family, NUM_LAYERS)
    lp.prune(loaded, attention=[0, 3], mlp=[1])  # layer 0 first: the cache's positions come from its first slot
    ids = _ids(rows=1)
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=256, eos_token_id=None)
    with torch.no_grad():
        cached = loaded.model.generate(ids, use_cache=True, **common)
        uncached = loaded.model.generate(ids, use_cache=False, **common)
        cache = loaded.model(ids, use_cache=True).past_key_values
    assert torch.equal(cached, uncached)
    slots = cache.layers
    assert isinstance(slots[0], TokenCount) and isinstance(slots[3], TokenCount)
    assert slots[0].keys is None and slots[0].get_seq_length() == ids.shape[1]
    assert all(slots[i].keys is not None and slots[i].keys.numel() > 0 for i in (1, 2, 4, 5))


def test_lineage_records_branches_in_the_original_numbering(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    lp.prune(loaded, [1])  # current layers are now originals 0, 2, 3, 4, 5
    lp.prune(loaded, attention=[1], mlp=[3])  # original 2's attention, original 4's MLP
    lp.prune(loaded, mlp=[1])  # original 2's MLP: original 2 has nothing left
    lineage = loaded.lineage
    assert lineage["removed_layers"] == [1, 2]
    assert lineage["removed_attention"] == [] and lineage["removed_mlp"] == [4]
    assert lineage["branches"] == [{"attention": i, "mlp": None if i == 4 else i} for i in (0, 3, 4, 5)]
    with pytest.raises(UsageError, match="already removed"):
        lp.prune(loaded, mlp=[2])


def test_export_packs_branches_into_standard_layers_and_reloads(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    lp.prune(loaded, attention=[3], mlp=[2])  # attention 2 takes MLP 3: one layer fewer, no zero partner
    with torch.no_grad():
        expected = loaded.model(_ids()).logits
    out = lp.save(loaded, tmp_path / "packed")
    record = json.loads((out / "layerprune.json").read_text())
    assert (record["num_layers"], record["zero_partners"]) == (5, 0)
    assert record["branches"][2] == {"attention": 2, "mlp": 3}
    assert (record["removed_attention"], record["removed_mlp"], record["removed_layers"]) == ([3], [2], [])
    assert loaded.num_layers == NUM_LAYERS, "saving leaves the model in memory as it was"
    again = lp.load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again.model(_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_reload_turns_zero_partners_back_into_removed_branches(tmp_path: Path) -> None:
    loaded = tiny_loaded("gemma3", NUM_LAYERS)
    lp.prune(loaded, attention=[1, 4])
    parameters = sum(p.numel() for p in loaded.model.parameters())
    out = lp.save(loaded, tmp_path / "zeros")
    record = json.loads((out / "layerprune.json").read_text())
    assert (record["num_layers"], record["zero_partners"]) == (NUM_LAYERS, 2)
    assert record["parameters"] > parameters  # the zero partners' weights are in the file
    again = lp.load_model(out)
    assert present_branches(again.model, again.adapter) == present_branches(loaded.model, loaded.adapter)
    assert sum(p.numel() for p in again.model.parameters()) == parameters
    assert again.model.config.layer_types == loaded.model.config.layer_types


def test_a_zero_partner_edited_after_export_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    loaded = tiny_loaded("llama", NUM_LAYERS)
    lp.prune(loaded, mlp=[2])
    out = lp.save(loaded, tmp_path / "edited")
    weights = load_file(out / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"] += 1.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="MLP|mlp"):
        lp.load_model(out)


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/plain.pt")
"""


def test_exported_checkpoints_reload_in_plain_transformers_with_the_same_logits(tmp_path: Path) -> None:
    """One fresh process (no layerprune imported) reloads every family's export."""
    folders = {}
    for family in SUBLAYER_FAMILIES:
        loaded = tiny_loaded(family, NUM_LAYERS)
        lp.prune(loaded, [4], attention=[0, 2], mlp=[3])
        folder = lp.save(loaded, tmp_path / family)
        torch.save(_ids(), folder / "ids.pt")
        with torch.no_grad():
            folders[family] = (folder, loaded.model(_ids()).logits)
    result = subprocess.run([sys.executable, "-c", _RELOAD, *(str(f) for f, _ in folders.values())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for family, (folder, expected) in folders.items():
        torch.testing.assert_close(torch.load(folder / "plain.pt"), expected, rtol=1e-5, atol=1e-5, msg=family)


@pytest.mark.parametrize(("present", "parallel", "plan"), [
    # attention-only cut: every MLP still needs a layer, so nothing is saved
    ([(True, True), (False, True), (True, True)], False, [(0, 0), (None, 1), (2, 2)]),
    # an MLP-less layer followed by an attention-less one: one layer holds both
    ([(True, True), (True, False), (False, True), (True, True)], False, [(0, 0), (1, 2), (3, 3)]),
    # the other order cannot pair: an MLP runs before the next attention
    ([(False, True), (True, False)], False, [(None, 0), (1, None)]),
    # a run of MLP-less layers then of attention-less ones: only the last attention pairs
    ([(True, False), (True, False), (False, True), (False, True)], False, [(0, None), (1, 2), (None, 3)]),
    # parallel residual: both branches read one input, so no layer takes another's branch
    ([(True, False), (False, True)], True, [(0, None), (None, 1)]),
])
def test_repacking_saves_exactly_the_layers_it_can(present, parallel, plan) -> None:
    assert repack_plan(present, parallel) == plan


def test_repacking_a_model_gives_the_planned_layer_count() -> None:
    loaded = tiny_loaded("qwen2", 4)
    lp.prune(loaded, attention=[2, 3], mlp=[0, 1])  # the last row of the plan cases above, in a model
    packed, zeros = export_form(loaded)
    assert (packed.num_layers, zeros) == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(packed.model(_ids()).logits, loaded.model(_ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "cut", "message"), [
    ("opt_post_norm", dict(attention=[1]), "post-norm"),
    ("llama", dict(attention=range(NUM_LAYERS), mlp=range(NUM_LAYERS)), "every attention and MLP"),
    ("llama", dict(attention=[NUM_LAYERS]), "out of range"),
    ("llama", dict(layers=[2], attention=[2]), "removed whole and their attention named"),
    ("llama", dict(mlp=[1, 1]), "more than once"),
])
def test_bad_branch_cuts_are_refused_and_leave_the_model_whole(family: str, cut: dict, message: str) -> None:
    loaded = tiny_loaded(family, NUM_LAYERS)
    before = present_branches(loaded.model, loaded.adapter)
    with pytest.raises(UsageError, match=message):
        lp.prune(loaded, **cut)
    assert present_branches(loaded.model, loaded.adapter) == before and loaded.num_layers == NUM_LAYERS


def test_a_record_from_before_the_branch_fields_still_loads(tmp_path: Path) -> None:
    from layerprune.models.provenance import read_record

    path = tmp_path / "layerprune.json"
    path.write_text(record_text("layerprune-before-format-version.json"))
    record = read_record(path)
    assert "branches" not in record and record["removed_layers"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.helpers import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("sublayer-checkpoints")
    return {family: save_tiny_checkpoint(root / family, family, NUM_LAYERS) for family in ("llama", "opt_post_norm")}


@pytest.mark.parametrize(("family", "flags", "message"), [
    ("llama", ["--attention", "0-5", "--mlp", "0-5"], "every attention and MLP"),
    ("llama", ["--mlp", "6"], "out of range"),
    ("llama", ["--layers", "2", "--attention", "1-2"], "removed whole and their attention"),
    ("llama", ["--attention", "1", "--low-memory"], "--low-memory"),
    ("opt_post_norm", ["--attention", "1"], "post-norm"),
])
def test_cli_refuses_bad_branch_cuts_with_nothing_written(checkpoints, tmp_path: Path, capsys, family: str,
                                                          flags: list[str], message: str) -> None:
    from layerprune.cli.main import main

    out = tmp_path / "out"
    assert main(["prune", "--model", str(checkpoints[family]), *flags, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_prunes_branches_and_says_what_the_export_holds(checkpoints, tmp_path: Path, capsys) -> None:
    from layerprune.cli.main import main

    out = tmp_path / "attention-only"
    assert main(["prune", "--model", str(checkpoints["llama"]), "--attention", "1,3", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "6 -> 6 layers, 2 zero partner(s)" in said and "decilm" in said
    # 2 KV heads of 8 dimensions, keys and values, float32: 128 bytes per attention layer and token
    assert "KV cache per token 768 -> 512 bytes (768 in plain transformers" in said
    record = json.loads((out / "layerprune.json").read_text())
    assert record["removed_attention"] == [1, 3] and record["zero_partners"] == 2
