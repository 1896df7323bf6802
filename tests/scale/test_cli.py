"""``layerprune prune`` on the files (shard surgery, the default for named layers), ``--low-memory`` and
``--device-map`` through the command line (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.cli.main import main
from layerprune.models import loading
from layerprune.models.tiny import tiny_model
from layerprune.scoring import score
from tests.helpers import save_tiny_checkpoint
from tests.scale.test_shards import assert_same_checkpoint, in_memory


def test_prune_low_memory_equals_the_in_memory_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "gemma3", max_shard_size="20KB")
    assert main(["prune", "--model", str(source), "--layers", "1,3-4", "--out", str(tmp_path / "disk"),
                 "--low-memory"]) == 0
    assert "6 -> 3 layers" in capsys.readouterr().out
    assert_same_checkpoint(tmp_path / "disk", in_memory(source, [1, 3, 4], tmp_path / "memory"))
    assert json.loads((tmp_path / "disk" / "layerprune.json").read_text())["source_model"] == str(source)


def _refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded, but shard surgery needs only its files")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("shard_size", ["2GB", "20KB"], ids=["single-file", "sharded"])
def test_named_layers_of_a_safetensors_checkpoint_are_cut_on_the_files_by_default(
        shard_size: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "gemma3", max_shard_size=shard_size)
    reference = in_memory(source, [1, 3, 4], tmp_path / "memory", max_shard_size=shard_size)
    _refuse_loading(monkeypatch)
    assert main(["prune", "--model", str(source), "--layers", "1,3-4", "--out", str(tmp_path / "disk")]) == 0
    assert "6 -> 3 layers" in capsys.readouterr().out
    assert_same_checkpoint(tmp_path / "disk", reference)


@pytest.mark.parametrize("extra", [["--generate", "hi", "--max-new-tokens", "2"], ["--dtype", "bfloat16"]],
                         ids=["generate", "dtype"])
def test_a_flag_that_needs_the_model_in_memory_loads_it(extra: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    loads: list[object] = []
    plain = loading.AutoModelForCausalLM.from_pretrained

    def counting(*args: object, **kwargs: object) -> object:
        loads.append(args[0])
        return plain(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", counting)
    assert main(["prune", "--model", str(source), "--layers", "1", "--out", str(tmp_path / "out"), *extra]) == 0
    assert len(loads) == 1
    weights = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.up_proj.weight
    assert weights.dtype == (torch.bfloat16 if "bfloat16" in extra else torch.float32)


def test_a_checkpoint_shard_surgery_cannot_read_is_loaded_instead(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Pickle weights: not a safetensors checkpoint, so the loader (which can read them) does the work."""
    source = save_tiny_checkpoint(tmp_path / "in", "llama", num_layers=4)
    (source / "model.safetensors").unlink()
    torch.save(tiny_model("llama", 4).state_dict(), source / "pytorch_model.bin")
    assert main(["prune", "--model", str(source), "--layers", "1", "--out", str(tmp_path / "out"),
                 "--allow-pickle"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--generate", "hi"], "cannot --generate"),
    (["--dtype", "bfloat16"], "change --dtype"),
    (["--metric", "bi", "--remove", "1"], "prunes named layers"),
])
def test_low_memory_refuses_what_it_cannot_do(extra: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    layers = [] if "--metric" in extra else ["--layers", "1"]
    assert main(["prune", "--model", str(source), *layers, "--out", str(tmp_path / "out"), "--low-memory",
                 *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_low_memory_needs_a_safetensors_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama")
    (source / "model.safetensors").rename(source / "weights.bin")
    assert main(["prune", "--model", str(source), "--layers", "1", "--out", str(tmp_path / "out"),
                 "--low-memory"]) == 2
    assert "needs a local safetensors checkpoint" in capsys.readouterr().err


def test_device_map_auto_loads_and_scores_like_a_plain_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "qwen2")
    seen: list[object] = []
    plain = AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("device_map"))
        return plain(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    spread = lp.load_model(source, device_map="auto")
    assert seen == ["auto"]  # handed to accelerate's placement (all on the CPU on this machine)
    rows = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    expected = score(lp.load_model(source), rows, "bi,ppl").results
    got = score(spread, rows, "bi,ppl").results
    for name in expected:
        assert got[name].importance == pytest.approx(expected[name].importance, rel=1e-6)


def test_unknown_device_map_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path / "missing"), "--device-map", "everywhere"]) == 2
    assert "--device-map 'everywhere' is unknown" in capsys.readouterr().err


def test_score_streaming_equals_score_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_checkpoint(tmp_path / "in", "llama", max_shard_size="20KB")
    common = ["score", "--model", str(source), "--metrics", "bi,ppl", "--data", "wiki-sample", "--samples", "4",
              "--seq-len", "16", "--remove", "2", "--strategy", "consecutive"]
    assert main([*common, "--output", str(tmp_path / "memory.json")]) == 0
    assert main([*common, "--output", str(tmp_path / "streamed.json"), "--streaming",
                 "--spill-dir", str(tmp_path)]) == 0
    memory, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("memory", "streamed"))
    for name in ("bi", "ppl"):
        assert streamed["importance"][name] == pytest.approx(memory["importance"][name], rel=1e-5)
    assert streamed["selection"] == memory["selection"]
    assert (streamed["data"]["batch_size"], memory["data"]["batch_size"]) == (1, 8)  # streaming saves memory by default
    assert main([*common[:-2], "--iterative", "--streaming"]) == 2
    assert "re-scores the pruned model in memory" in capsys.readouterr().err
    assert main([*common, "--granularity", "sublayer", "--streaming", "--output", str(tmp_path / "branches.json")]) == 2
    assert "layer streaming scores whole layers" in capsys.readouterr().err and not (tmp_path / "branches.json").exists()
