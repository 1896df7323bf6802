"""Shard surgery equals the in-memory path (``lp.prune`` + ``lp.save``) tensor for tensor."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.models import shards
from layerprune.models.shards import prune_checkpoint, read_header
from layerprune.models.tiny import tiny_model
from tests.conftest import FAMILIES
from tests.helpers import save_tiny_checkpoint

REMOVE = [0, 3, 5]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library itself."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found


def in_memory(folder: Path, layers: list[int], out: Path, max_shard_size: str = "2GB") -> Path:
    loaded = lp.load_model(folder, dtype="float32")
    lp.prune(loaded, layers)
    return lp.save(loaded, out, max_shard_size=max_shard_size)


def assert_same_checkpoint(on_disk: Path, reference: Path) -> None:
    """Same tensors bit for bit (names, dtypes, shapes, bytes), same config, same provenance and card."""
    ours, theirs = tensors(on_disk), tensors(reference)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert json.loads((on_disk / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    undated = [{k: v for k, v in json.loads((f / "layerprune.json").read_text()).items() if k != "date"}
               for f in (on_disk, reference)]
    assert undated[0] == undated[1]
    # the card's snippet opens its own folder, so the two cards differ in that path only
    assert str(on_disk) in (on_disk / "README.md").read_text()
    assert ((on_disk / "README.md").read_text().replace(str(on_disk), "OUT")
            == (reference / "README.md").read_text().replace(str(reference), "OUT"))


@pytest.mark.parametrize("shard_size", ["2GB", "20KB"], ids=["single-file", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_in_memory_path(family: str, shard_size: str, tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", family, max_shard_size=shard_size)
    out = prune_checkpoint(source, REMOVE, tmp_path / "disk")
    assert_same_checkpoint(out, in_memory(source, REMOVE, tmp_path / "memory"))
    assert (out / shards.INDEX_FILE).is_file() == (shard_size == "20KB")
    # straightforward reference: new layer i holds the bytes of kept original layer kept[i]
    kept = [i for i in range(6) if i not in REMOVE]
    layers = shards.load_checkpoint_config(source)[1].layers
    before, after = tensors(source), tensors(out)
    for new, old in enumerate(kept):
        olds = {k.removeprefix(f"{layers}.{old}."): v for k, v in before.items() if k.startswith(f"{layers}.{old}.")}
        news = {k.removeprefix(f"{layers}.{new}."): v for k, v in after.items() if k.startswith(f"{layers}.{new}.")}
        assert olds and olds.keys() == news.keys() and all(torch.equal(olds[k], news[k]) for k in olds)


def test_output_loads_and_runs_like_the_in_memory_result(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "gemma3", max_shard_size="20KB")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(prune_checkpoint(source, [1, 2], tmp_path / "disk"))(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(in_memory(source, [1, 2], tmp_path / "memory"))(ids).logits
        unpruned = AutoModelForCausalLM.from_pretrained(source)(ids).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, unpruned, atol=1e-3)


def test_gpt2_base_checkpoint_without_transformer_prefix(tmp_path: Path) -> None:
    """A GPT-2 base checkpoint names its layers ``h.<i>.``, not the module path ``transformer.h.<i>.``."""
    model = tiny_model("gpt2", 6)
    model.transformer.save_pretrained(tmp_path / "in")
    model.config.save_pretrained(tmp_path / "in")  # the causal-LM config, as hub repos ship it
    out = prune_checkpoint(tmp_path / "in", [2], tmp_path / "disk")
    names = set(tensors(out))
    assert "h.4.mlp.c_fc.weight" in names and "h.5.mlp.c_fc.weight" not in names
    assert torch.equal(tensors(out)["h.2.attn.c_attn.weight"], tensors(tmp_path / "in")["h.3.attn.c_attn.weight"])
    reference = AutoModelForCausalLM.from_pretrained(in_memory(tmp_path / "in", [2], tmp_path / "memory"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    theirs = reference.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in reloaded.state_dict().items())


def test_pruning_twice_maps_indices_back_to_the_original(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama", num_layers=8)
    once = prune_checkpoint(source, [1], tmp_path / "once")
    twice = prune_checkpoint(once, [1, 5], tmp_path / "twice")
    record = json.loads((twice / "layerprune.json").read_text())
    assert record["removed_layers"] == [1, 2, 6] and record["kept_layers"] == [0, 3, 4, 5, 7]
    assert record["original_num_layers"] == 8 and record["num_layers"] == 5
    loaded = lp.load_model(once, dtype="float32")
    lp.prune(loaded, [1, 5])
    assert_same_checkpoint(twice, lp.save(loaded, tmp_path / "memory"))


def test_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Platforms without ``os.copy_file_range`` (macOS) take the chunked copy; same bytes."""
    source = save_tiny_checkpoint(tmp_path / "in", "qwen3", max_shard_size="20KB")
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(shards, "_COPY_CHUNK", 1000)  # many chunks per tensor
    assert_same_checkpoint(prune_checkpoint(source, REMOVE, tmp_path / "disk"),
                           in_memory(source, REMOVE, tmp_path / "memory"))


def _refused(source: Path, layers: list[int], out: Path, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        prune_checkpoint(source, layers, out)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_layer_indices_are_refused_before_writing(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    _refused(source, [6], tmp_path / "out", "out of range")
    _refused(source, list(range(6)), tmp_path / "out", "cannot remove all")
    _refused(source, [], tmp_path / "out", "no layers")


def test_output_inside_the_input_is_refused(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    with pytest.raises(UsageError, match="lies inside the input"):
        prune_checkpoint(source, [1], source / "pruned")


def test_inconsistent_or_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))
    _refused(source, [1], tmp_path / "out", "says 8 layers")
    (source / "config.json").write_text(json.dumps(config))
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(source, [1], tmp_path / "out", "truncated")
    weights.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    _refused(source, [1], tmp_path / "out", "not a valid safetensors")
    weights.unlink()
    _refused(source, [1], tmp_path / "out", "neither model.safetensors")


def test_gpt2_scaling_by_layer_index_is_refused(tmp_path: Path) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "gpt2")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    _refused(source, [1], tmp_path / "out", "scales attention by its layer index")


def test_header_round_trip_matches_the_library(tmp_path: Path) -> None:
    """Our header reader agrees with safetensors on every tensor's dtype, shape and bytes."""
    source = save_tiny_checkpoint(tmp_path / "in", "phi3")
    header = read_header(source / "model.safetensors")
    raw = (source / "model.safetensors").read_bytes()
    reference = tensors(source)
    assert sorted(t.name for t in header.tensors) == sorted(reference)
    for entry in header.tensors:
        expected = reference[entry.name]
        assert entry.shape == tuple(expected.shape)
        assert raw[header.data_start + entry.start:header.data_start + entry.end] == expected.numpy().tobytes()


@pytest.mark.real
def test_smollm2_in_shards_equals_in_memory_path(smollm2_sharded: Path, tmp_path: Path) -> None:
    assert len(list(smollm2_sharded.glob("*.safetensors"))) >= 5
    layers = [3, 10, 11, 25]
    out = prune_checkpoint(smollm2_sharded, layers, tmp_path / "disk")
    assert_same_checkpoint(out, in_memory(smollm2_sharded, layers, tmp_path / "memory", max_shard_size="100MB"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 26
