"""``--format decilm``: a sub-layer cut as DeciLMForCausalLM with ``block_configs``, read back by an
independent reader of the layout (plain torch, from config.json and the safetensors files, as the
runtimes' loaders read it) and by layerprune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.models.architectures import adapter_for
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import present_branches
from layerprune.models.tiny import byte_tokenizer, tiny_config
from tests.helpers import save_tiny_checkpoint, tiny_loaded

NUM_LAYERS = 6


def _llama(num_layers: int = NUM_LAYERS) -> LoadedModel:
    """A tiny Llama whose MLP width (256) the runtimes' ``ffn_mult`` rounding can express."""
    config = tiny_config("llama", num_layers)
    config.intermediate_size = 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, byte_tokenizer(), "tiny-llama-256", adapter_for(model))


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (halves rotated), positions 0..n-1; ``x`` is [batch, heads, n, dim]."""
    dim, n = x.shape[-1], x.shape[-2]
    frequencies = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(n, dtype=torch.float32), frequencies)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
    return x * cos + half * sin


def read_decilm(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the DeciLM checkpoint in ``folder``, computed as vLLM's nemotron_nas.py and mlx-lm's
    nemotron-nas.py compute them: per block, the attention (with its input norm) unless ``no_op``,
    then the MLP (with its pre-MLP norm, width from ``ffn_mult`` rounded up to 256) unless ``no_op``."""
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    weights = {name: tensor for file in folder.glob("*.safetensors") for name, tensor in load_file(file).items()}
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    head_dim = hidden // heads
    x = weights["model.embed_tokens.weight"][ids]
    rows, n = ids.shape
    for i, block in enumerate(config["block_configs"]):
        w = {name.removeprefix(f"model.layers.{i}."): t for name, t in weights.items()
             if name.startswith(f"model.layers.{i}.")}
        if block["attention"]["no_op"]:
            assert not any(name.startswith(("self_attn.", "input_layernorm.")) for name in w)
        else:
            kv_heads = heads // block["attention"]["n_heads_in_group"]
            h = _rms(x, w["input_layernorm.weight"], eps)
            q = (h @ w["self_attn.q_proj.weight"].T).view(rows, n, heads, head_dim).transpose(1, 2)
            k = (h @ w["self_attn.k_proj.weight"].T).view(rows, n, kv_heads, head_dim).transpose(1, 2)
            v = (h @ w["self_attn.v_proj.weight"].T).view(rows, n, kv_heads, head_dim).transpose(1, 2)
            q, k = _rotate(q, theta), _rotate(k, theta)
            k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(rows, n, hidden)
            x = x + attended @ w["self_attn.o_proj.weight"].T
        if block["ffn"]["no_op"]:
            assert not any(name.startswith(("mlp.", "post_attention_layernorm.")) for name in w)
        else:
            width = int(2 * block["ffn"]["ffn_mult"] * hidden / 3)
            width += -width % 256
            assert w["mlp.gate_proj.weight"].shape[0] == width
            h = _rms(x, w["post_attention_layernorm.weight"], eps)
            gated = torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
            x = x + gated @ w["mlp.down_proj.weight"].T
    x = _rms(x, weights["model.norm.weight"], eps)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return x @ head.T


def test_decilm_export_is_read_by_an_independent_reader_and_by_layerprune(tmp_path: Path) -> None:
    loaded = _llama()
    lp.prune(loaded, [5], attention=[1, 3], mlp=[2])
    with torch.no_grad():
        expected = loaded.model(_ids()).logits
    out = lp.save(loaded, tmp_path / "deci", format="decilm")
    config = json.loads((out / "config.json").read_text())
    assert [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in config["block_configs"]] == [
        (False, False), (True, False), (False, True), (True, False), (False, False)]
    assert config["num_hidden_layers"] == 5
    torch.testing.assert_close(read_decilm(out, _ids()), expected, rtol=1e-4, atol=1e-4)
    record = json.loads((out / "layerprune.json").read_text())
    assert record["format"] == "decilm" and record["zero_partners"] == 0 and record["num_layers"] == 5
    assert (record["removed_layers"], record["removed_attention"], record["removed_mlp"]) == ([5], [1, 3], [2])

    again = lp.load_model(out)
    assert present_branches(again.model, again.adapter) == present_branches(loaded.model, loaded.adapter)
    with torch.no_grad():
        torch.testing.assert_close(again.model(_ids()).logits, expected, rtol=1e-5, atol=1e-5)
    plain = lp.save(again, tmp_path / "plain")  # and on to the standard form, which plain transformers loads
    with torch.no_grad():
        reloaded = LlamaForCausalLM.from_pretrained(plain).eval()
        torch.testing.assert_close(reloaded(_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_decilm_holds_a_whole_layer_cut_too(tmp_path: Path) -> None:
    loaded = _llama(4)
    lp.prune(loaded, [2])
    with torch.no_grad():
        expected = loaded.model(_ids()).logits
    out = lp.save(loaded, tmp_path / "deci", format="decilm")
    torch.testing.assert_close(read_decilm(out, _ids()), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("loaded", "message"), [
    (lambda: tiny_loaded("qwen2", NUM_LAYERS), "Llama-architecture"),
    (lambda: tiny_loaded("gemma3", NUM_LAYERS), "Llama-architecture"),
    (lambda: tiny_loaded("llama", NUM_LAYERS), "multiple of 256"),
])
def test_decilm_refuses_what_its_layout_cannot_hold(tmp_path: Path, loaded, message: str) -> None:
    model = loaded()
    lp.prune(model, attention=[1])
    with pytest.raises(UsageError, match=message):
        lp.save(model, tmp_path / "out", format="decilm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format", ["decilm", "gguf"])
def test_cli_decilm_for_another_family_exits_2_with_nothing_written(tmp_path: Path, capsys, format: str) -> None:
    from layerprune.cli.main import main

    source = save_tiny_checkpoint(tmp_path / "qwen2", "qwen2", NUM_LAYERS)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["prune", "--model", str(source), "--attention", "1", "--format", format, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "format transformers" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_prunes_branches_into_decilm(tmp_path: Path, capsys) -> None:
    from layerprune.cli.main import main

    source = tmp_path / "llama"
    _llama().model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    out = tmp_path / "deci"
    assert main(["prune", "--model", str(source), "--attention", "0,2", "--format", "decilm", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "6 -> 6 layers" in said and "decilm drops" not in said
    assert "KV cache per token 768 -> 512 bytes;" in said  # 128 bytes per attention layer, none for zero partners
    assert [b["attention"]["no_op"] for b in json.loads((out / "config.json").read_text())["block_configs"]] == [
        True, False, True, False, False, False]


def test_a_branch_cut_as_gguf_is_llama_cpps_deci_and_computes_the_same(tmp_path: Path) -> None:
    """llama.cpp's deci reads per-layer head counts and MLP widths, 0 meaning no such branch."""
    import gguf

    pytest.importorskip("llama_cpp")
    from tests.gguf.test_gguf_export import llama_cpp_logits

    loaded = tiny_loaded("llama", NUM_LAYERS)  # the MLP width needs no ffn_mult here: GGUF stores it
    lp.prune(loaded, [5], attention=[1, 3])
    ids = _ids()[:1]
    with torch.no_grad():
        expected = loaded.model(ids).logits[0].numpy()
    out = lp.save(loaded, tmp_path / "deci", format="gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 5
    assert fields["deci.attention.head_count"] == [4, 0, 4, 0, 4]
    assert fields["deci.feed_forward_length"] == [64] * 5
    names = {tensor.name for tensor in reader.tensors}
    assert "blk.1.attn_q.weight" not in names and "blk.1.attn_norm.weight" not in names
    assert "blk.2.attn_q.weight" in names
    record = json.loads((out / "layerprune.json").read_text())
    assert record["gguf"]["architecture"] == "deci" and record["removed_attention"] == [1, 3]
    import numpy as np

    np.testing.assert_allclose(llama_cpp_logits(out / "model.gguf", ids[0].tolist()), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("cut", "message"), [
    (dict(attention=[0]), "first layer has attention"),
    (dict(mlp=[2]), "drops the attention of a layer without MLP"),
])
def test_gguf_refuses_what_llama_cpps_deci_computes_otherwise(tmp_path: Path, cut: dict, message: str) -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    lp.prune(loaded, **cut)
    with pytest.raises(UsageError, match=message):
        lp.save(loaded, tmp_path / "out", format="gguf")
    assert list(tmp_path.iterdir()) == []
