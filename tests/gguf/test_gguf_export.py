"""``--format gguf``: a GGUF file llama.cpp and transformers' GGUF loader read back.

The references are independent of the writer: tensor bytes are read back with ``gguf.GGUFReader`` and
compared with the source file's; reloaded logits are compared with the in-memory model's; a
requantized tensor is compared with ``gguf.quants.quantize`` of the model's own values. llama.cpp
checks run where llama-cpp-python is installed (``layerprune[llamacpp]``) and are skipped, saying so,
where it is not.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.data import load_texts
from layerprune.models.gguf_export import to_gguf_layout
from layerprune.models.gguf_file import ARCHITECTURES, GGUF_FILE, RECORD_KEY, layer_name, layer_of, prune_gguf
from layerprune.models.tiny import tiny_config
from tests.conftest import FAMILIES
from tests.helpers import save_tiny_checkpoint, tiny_loaded

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (layerprune[llamacpp])")

# tiny families llama.cpp reads as written: Gemma-3's tiny model scales attention by 1/sqrt(256), not by
# 1/sqrt(head_dim) as llama.cpp's Gemma-3 does, so it is refused (the real Gemma-3 is tested below)
COVERED = ["llama", "qwen2", "qwen3"]
# transformers' GGUF config table has no head_dim for qwen3: it reads back only Qwen3's own 128
TRANSFORMERS_READS = ["llama", "qwen2"]
HELD_OUT = "The committee met again in the spring, and after a long debate it agreed to publish the report."


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerprune.cli.main", *args], capture_output=True, text=True)


def tensors_of(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str) -> object:
    found = gguf.GGUFReader(path).fields.get(key)
    return None if found is None else found.contents()


def assert_kept_tensors_identical(source: Path, pruned: Path, kept: list[int]) -> None:
    """Every tensor of ``pruned`` is its source tensor (renumbered): same type, same shape, same bytes."""
    before, after = tensors_of(source), tensors_of(pruned)
    expected = {name for name in before if layer_of(name) is None or layer_of(name)[0] in kept}
    assert len(after) == len(expected)
    for name, tensor in after.items():
        where = layer_of(name)
        original = before[name if where is None else layer_name(kept[where[0]], where[1])]
        assert tensor.tensor_type == original.tensor_type, name
        assert list(tensor.shape) == list(original.shape), name
        assert tensor.data.tobytes() == original.data.tobytes(), name


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


@pytest.mark.parametrize("family", COVERED)
def test_a_tiny_model_written_as_gguf_reloads_and_cuts_byte_for_byte(family: str, tmp_path: Path) -> None:
    loaded = tiny_loaded(family, 4)
    written = lp.save(loaded, tmp_path / "full", format="gguf")
    path = written / GGUF_FILE
    record = json.loads((written / "layerprune.json").read_text())
    assert record == json.loads(field(path, RECORD_KEY)), "the GGUF metadata holds the same record"
    assert {t["type"] for t in record["gguf"]["tensors"].values()} == {"F32"}, "a float32 source stays F32"
    assert {t["written"] for t in record["gguf"]["tensors"].values()} == {"quantized"}
    ids = torch.tensor([list(HELD_OUT.encode())[:48]])
    expected = loaded.model(ids).logits[0].detach()
    if family in TRANSFORMERS_READS:
        reloaded = AutoModelForCausalLM.from_pretrained(written, gguf_file=GGUF_FILE)
        torch.testing.assert_close(reloaded(ids).logits[0], expected, atol=1e-5, rtol=1e-5)

    cut = prune_gguf(path, [1], tmp_path / "cut")  # the written file as a GGUF source: only layers removed
    assert_kept_tensors_identical(path, cut / GGUF_FILE, [0, 2, 3])
    arch = ARCHITECTURES[tiny_config(family, 4).model_type]
    assert field(cut / GGUF_FILE, f"{arch}.block_count") == 3
    assert field(cut / GGUF_FILE, gguf.Keys.Tokenizer.LIST) == field(path, gguf.Keys.Tokenizer.LIST)
    lp.prune(loaded, [1])
    pruned = loaded.model(ids).logits[0].detach().numpy()
    if family in TRANSFORMERS_READS:
        reloaded = AutoModelForCausalLM.from_pretrained(cut, gguf_file=GGUF_FILE)
        np.testing.assert_allclose(reloaded(ids).logits[0].detach().numpy(), pruned, atol=1e-5, rtol=1e-5)
    if HAS_LLAMA_CPP:  # F32 weights: llama.cpp differs only in the order it sums in
        np.testing.assert_allclose(llama_cpp_logits(cut / GGUF_FILE, ids[0].tolist()), pruned, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(COVERED)))
def test_a_family_layerprune_does_not_write_as_gguf_exits_2_with_nothing_written(family: str, tmp_path: Path) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", family, 4)
    result = run_cli("prune", "--model", str(model), "--layers", "1", "--format", "gguf", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--format transformers" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--format", "gguf", "--gguf-type", "Q4_K"], "reads but cannot write"),
    (["--format", "gguf", "--gguf-type", "Q9"], "is not a GGUF tensor type"),
    (["--gguf-type", "Q8_0"], "applies to format gguf only"),
    (["--format", "gguf", "--device-map", "auto"], "--device-map"),
])
def test_bad_gguf_flags_exit_2_before_anything_is_written(flags: list[str], message: str, tmp_path: Path) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    result = run_cli("prune", "--model", str(model), "--layers", "1", "--out", str(tmp_path / "out"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_a_changed_tensor_is_quantized_to_the_type_asked_for(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama", 4)
    written = lp.save(loaded, tmp_path / "q8", format="gguf", gguf_type="Q8_0")
    tensors = tensors_of(written / GGUF_FILE)
    up = tensors["blk.2.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q8_0
    reference = gguf.quants.quantize(loaded.model.model.layers[2].mlp.up_proj.weight.detach().numpy(),
                                     gguf.GGMLQuantizationType.Q8_0)
    assert up.data.tobytes() == reference.tobytes()
    assert tensors["blk.2.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32, "norms stay F32"


def test_streaming_a_gguf_file_keeps_memory_far_below_its_size(tmp_path: Path) -> None:
    """A 96 MiB file cut in a subprocess: its peak resident memory grows by less than a tenth of the
    file (the tensors are copied by the kernel, never read into the process)."""
    source = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_block_count(6)
    rng = np.random.default_rng(0)
    for layer in range(6):
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", rng.standard_normal((1024, 4096), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    script = textwrap.dedent(f"""
        import json, resource
        from layerprune.models.gguf_file import prune_gguf
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prune_gguf({str(source)!r}, [1, 4], {str(tmp_path / 'cut')!r})
        print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    assert (after - before) * 1024 < source.stat().st_size / 10
    assert_kept_tensors_identical(source, tmp_path / "cut" / GGUF_FILE, [0, 2, 3, 5])


@pytest.mark.real
@pytest.mark.parametrize(("alias", "layers"), [("smollm2-135m", [20, 21, 22]), ("gemma3-270m", [4, 17])])
def test_a_real_gguf_model_cut_keeps_every_tensor_and_reloads(alias: str, layers: list[int], tmp_path: Path) -> None:
    from layerprune.models.aliases import MODEL_ALIASES, fetch_alias_gguf

    source = fetch_alias_gguf(MODEL_ALIASES[alias])
    result = run_cli("prune", "--model", alias, "--layers", ",".join(map(str, layers)), "--format", "gguf",
                     "--out", str(tmp_path / "cut"))
    assert result.returncode == 0, result.stderr
    path = tmp_path / "cut" / GGUF_FILE
    arch = field(source, gguf.Keys.General.ARCHITECTURE)
    total = field(source, f"{arch}.block_count")
    kept = [index for index in range(total) if index not in layers]
    assert_kept_tensors_identical(source, path, kept)
    assert field(path, f"{arch}.block_count") == len(kept)
    for key in (gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.CHAT_TEMPLATE):
        assert field(path, key) == field(source, key)
    if arch == "gemma3":  # llama.cpp's period of 6 (the 6th layer full), spelled out for the kept layers
        assert field(path, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)) == \
            [index % 6 < 5 for index in kept]

    original = lp.load_model(alias)  # the alias is this GGUF de-quantized once and cached (float32, exact)
    lp.prune(original, layers)
    reloaded = lp.load_model(str(path))
    assert reloaded.lineage["removed_layers"] == layers
    text = "\n\n".join(load_texts("wiki-sample", "test"))[:4000]
    ids = original.tokenizer(text, return_tensors="pt").input_ids[:, :200]
    expected = original.model(ids).logits[0].detach()
    torch.testing.assert_close(reloaded.model(ids).logits[0].detach(), expected, atol=0, rtol=0)
    if HAS_LLAMA_CPP:
        # llama.cpp multiplies quantized weights by activations it quantizes to 8 bits, transformers by the
        # de-quantized floats: over 200 held-out tokens the greedy next tokens agree at 90% of the positions
        # or more (measured: uncut Gemma-3 96%, SmolLM2 97.5%). A cut that damages the model more amplifies
        # llama.cpp's other order of summation: Gemma-3 without layers 3 and 9 agrees at 85.5% here, and at
        # 91% even with F32 weights (mean KL 0.018 against 0.002 uncut, 0.0024 without layer 4 alone), so
        # the layers cut here are ones that leave the model well-conditioned
        ours = llama_cpp_logits(path, ids[0].tolist()).argmax(axis=1)
        agree = float((ours == expected.argmax(dim=1).numpy()).mean())
        assert agree >= 0.9, agree


@pytest.mark.real
def test_a_repaired_real_model_requantizes_only_the_folded_tensors(tmp_path: Path) -> None:
    loaded = lp.load_model("smollm2-135m")
    from layerprune.repair import compensate

    compensate(loaded, [20, 21], "merge", None)  # LaCo: the removed layers' differences folded into layer 19
    written = lp.save(loaded, tmp_path / "merged", format="gguf")
    record = json.loads((written / "layerprune.json").read_text())["gguf"]["tensors"]
    quantized = {name for name, entry in record.items() if entry["written"] == "quantized"}
    assert quantized and all(name.startswith("blk.19.") for name in quantized)
    tensors = tensors_of(written / GGUF_FILE)
    for name in quantized:
        assert record[name]["type"] == tensors[name].tensor_type.name
    # one folded matrix, byte for byte the gguf package's Q4_1 of the model's values in llama.cpp's layout
    name = next(n for n in sorted(quantized) if tensors[n].tensor_type == gguf.GGMLQuantizationType.Q4_1)
    hf = {"ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}[name.split(".")[2]]
    value = loaded.model.get_submodule(f"model.layers.19.{hf}").weight.detach().numpy()
    reference = gguf.quants.quantize(to_gguf_layout("llama", name, value, loaded.model.config),
                                     gguf.GGMLQuantizationType.Q4_1)
    assert tensors[name].data.tobytes() == reference.tobytes()


def test_a_recipe_and_heal_write_gguf_through_their_export_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from layerprune.recipes import run_recipe
    from tests.helpers import write_corpus

    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: tiny\ncalibration: {source: corpus.txt, samples: 8, seq_len: 32}\n"
                      "score: {metrics: [bi], batch_size: 4}\nselect: {remove: 2}\nexport: {format: gguf, gguf_type: Q8_0}\n")
    out = run_recipe(recipe, tmp_path / "run", log=lambda _: None)
    path = out / "model" / GGUF_FILE
    assert field(path, "llama.block_count") == 4
    assert tensors_of(path)["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    result = run_cli("heal", "--model", str(tmp_path / "tiny"), "--method", "partial-ft", "--data", "corpus.txt",
                     "--steps", "1", "--format", "gguf", "--out", str(tmp_path / "healed"))
    assert result.returncode == 0, result.stderr
    assert field(tmp_path / "healed" / GGUF_FILE, "llama.block_count") == 6
