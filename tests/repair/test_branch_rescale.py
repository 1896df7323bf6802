"""``rescale`` (Prune&Comp) at a cut of attention and MLP branches: the repaired model equals an
independent reference built with hooks on the original (removed branches zeroed, the stream after each
removed run multiplied by its ``s``), in memory and after the transformers export; refusals exit 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.cli.main import main
from layerprune.errors import UsageError
from layerprune.healing import TrainingSet
from layerprune.models.loading import LoadedModel
from layerprune.repair import check_branch_repair, compensate
from tests.helpers import save_tiny_checkpoint, tiny_loaded, write_corpus, zeroing_branches

NUM_LAYERS = 6
# What each family's attention adds to the residual, written down here independently of the adapters.
ATTENTION_ADDED = {"llama": "self_attn.o_proj", "gemma3": "post_attention_layernorm", "gpt2": "attn.c_proj"}
STREAM_NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"),
                "gemma3": ("input_layernorm", "pre_feedforward_layernorm"), "gpt2": ("ln_1", "ln_2")}
FINAL_NORM = {"llama": "model.norm", "gemma3": "model.norm", "gpt2": "transformer.ln_f"}
CUTS = {  # (whole layers, attention, MLP) -> the removed runs of units (2i: attn.i, 2i + 1: mlp.i)
    "scattered": (([], [1, 3], [3, 4]), [(2, 3), (6, 8), (9, 10)]),
    "whole layer inside": (([2], [5], [1]), [(3, 6), (10, 11)]),
    "first and last unit": (([], [0], [5]), [(0, 1), (11, 12)]),
}


def rows(count: int = 12, seq_len: int = 16, seed: int = 0) -> TrainingSet:
    return TrainingSet.from_ids(torch.randint(0, 256, (count, seq_len), generator=torch.Generator().manual_seed(seed)))


def layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def exact_stream_norms(loaded: LoadedModel, family: str) -> LoadedModel:
    """The norms that read the residual stream with epsilon 0, so they are exactly scale-invariant (the
    norms after a branch keep theirs: a removed branch's zero output goes through them)."""
    norms = [layer.get_submodule(path) for layer in layers_of(loaded.model) for path in STREAM_NORMS[family]]
    for norm in [*norms, loaded.model.get_submodule(FINAL_NORM[family])]:
        for name in ("eps", "variance_epsilon"):
            if isinstance(getattr(norm, name, None), float):
                setattr(norm, name, 0.0)
    return loaded


def streams(model: torch.nn.Module, family: str, ids: torch.Tensor,
            attention_added: dict[str, str] = ATTENTION_ADDED) -> list[torch.Tensor]:
    """The residual stream at every unit boundary of the original, as ``[tokens, H]``: position ``2i``
    enters layer ``i``, ``2i + 1`` is that plus what its attention adds (the output of the module
    ``attention_added[family]``, times Granite's ``residual_multiplier``), ``2L`` leaves the last layer."""
    layers = layers_of(model)
    multiplier = getattr(model.config, "residual_multiplier", 1.0)
    entering, added, last = {}, {}, []
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: entering.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.get_submodule(attention_added[family]).register_forward_hook(
            lambda m, args, output, i=i: added.__setitem__(i, output * multiplier)))
    handles.append(layers[-1].register_forward_hook(
        lambda m, args, output: last.append(output[0] if isinstance(output, tuple) else output)))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    out = [s for i in range(len(layers)) for s in (entering[i], entering[i] + added[i])] + [last[0]]
    return [s.reshape(-1, s.shape[-1]).double() for s in out]


def magnitude_ratio(states: list[torch.Tensor], start: int, end: int) -> float:
    return float((states[end].abs().mean(0) / states[start].abs().mean(0)).mean())


def reference_logits(original: LoadedModel, cut: tuple, runs: list[tuple[int, int]], scales: list[float],
                     ids: torch.Tensor) -> torch.Tensor:
    """The original with the removed branches' outputs zeroed and, where each run ends before a layer's
    attention or MLP, the layer's input multiplied by ``s`` (the units of that layer before the end are
    removed, so this is the stream at the end)."""
    layers, attention, mlp = cut
    model = copy.deepcopy(original.model)
    for (_, end), scale in zip(runs, scales):
        if end < 2 * NUM_LAYERS:
            layers_of(model)[end // 2].register_forward_pre_hook(
                lambda m, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs) if args else
                (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}), with_kwargs=True)
    with torch.no_grad(), zeroing_branches(model, [*attention, *layers], [*mlp, *layers]):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("family", sorted(ATTENTION_ADDED))
def test_branch_rescale_equals_the_hooked_reference_in_memory_and_reloaded(family: str, cut: str,
                                                                           tmp_path: Path) -> None:
    (layers, attention, mlp), runs = CUTS[cut]
    original = exact_stream_norms(tiny_loaded(family, NUM_LAYERS), family)
    repaired = exact_stream_norms(tiny_loaded(family, NUM_LAYERS), family)
    data = rows()
    states = streams(original.model, family, data.input_ids)
    scales = [magnitude_ratio(states, start, end) for start, end in runs]
    report = compensate(repaired, layers, "rescale", data, attention=attention, mlp=mlp)
    assert [r["s"] for r in report.runs] == pytest.approx(scales, rel=1e-6)
    probe = rows(3, 12, seed=5).input_ids
    expected = reference_logits(original, (layers, attention, mlp), runs, scales, probe)
    with torch.no_grad():
        got = repaired.model(input_ids=probe).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        plain = reference_logits(original, (layers, attention, mlp), runs, [1.0] * len(runs), probe)
        if any(end < 2 * NUM_LAYERS for _, end in runs):
            assert not torch.equal(got, plain)  # the repair changed something
    assert repaired.num_layers == NUM_LAYERS - len(set(layers) | (set(attention) & set(mlp)))
    out = lp.save(repaired, tmp_path / "repaired")
    record = json.loads((out / "layerprune.json").read_text())
    (repair,) = record["repairs"]
    assert repair["method"] == "rescale" and [r["s"] for r in repair["runs"]] == pytest.approx(scales, rel=1e-6)
    units = [[("attn" if u % 2 == 0 else "mlp") + f".{u // 2}" for u in range(a, b)] for a, b in runs]
    assert [r["units"] for r in repair["runs"]] == units
    assert [r["at_end"] for r in repair["runs"]] == [b == 2 * NUM_LAYERS for _, b in runs]
    again = exact_stream_norms(lp.load_model(out), family)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=probe).logits, got, rtol=1e-5, atol=1e-5)


def test_a_whole_layer_cut_gets_the_same_weights_through_the_unit_fold() -> None:
    """The whole-layer rescale is the unit fold with each layer's two units: cutting layers 2-3 as
    layers and as their four branches gives the same weights and the same ``s``."""
    data = rows()
    as_layers, as_branches = tiny_loaded("llama", NUM_LAYERS), tiny_loaded("llama", NUM_LAYERS)
    first = compensate(as_layers, [2, 3], "rescale", data)
    second = compensate(as_branches, [], "rescale", data, attention=[2, 3], mlp=[2, 3])
    assert second.runs[0]["s"] == pytest.approx(first.runs[0]["s"], rel=1e-9)
    for (name, a), (_, b) in zip(as_layers.model.state_dict().items(), as_branches.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_branch_cut_refusals_name_the_reason() -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    with pytest.raises(UsageError, match="whole layers only.*rescale"):
        compensate(loaded, [], "merge", None, attention=[2])
    with pytest.raises(UsageError, match="every attention and MLP"):
        compensate(loaded, [], "rescale", rows(), attention=list(range(6)), mlp=list(range(6)))
    with pytest.raises(UsageError, match="out of range|exceeds|only has|range"):
        compensate(loaded, [], "rescale", rows(), attention=[9])
    with pytest.raises(UsageError, match="calibration"):
        compensate(loaded, [], "rescale", None, attention=[2])
    assert loaded.num_layers == NUM_LAYERS and "repairs" not in loaded.lineage  # nothing was changed
    parallel = tiny_loaded("gpt_neox", NUM_LAYERS)
    assert parallel.adapter.parallel_residual
    with pytest.raises(UsageError, match="parallel"):
        compensate(parallel, [], "rescale", rows(), attention=[2])
    # both branches of a layer: a run on layer boundaries, refused by the check (a search's filter), not later
    with pytest.raises(UsageError, match="parallel.*--layers"):
        check_branch_repair(parallel, [], [2], [2], "rescale")


CALIBRATION = ["--sampling", "contiguous", "--samples", "8", "--seq-len", "64"]


def test_prune_compensate_rescale_at_a_branch_cut_and_refusals_write_nothing(tmp_path: Path, capsys) -> None:
    original = save_tiny_checkpoint(tmp_path / "original", "llama")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "cut"
    argv = ["prune", "--model", str(original), "--attention", "1,3", "--mlp", "3", "--compensate", "rescale",
            "--data", str(corpus), *CALIBRATION, "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "layerprune.json").read_text())
    (repair,) = record["repairs"]
    assert [r["units"] for r in repair["runs"]] == [["attn.1"], ["attn.3", "mlp.3"]]
    assert record["healing"][0]["method"] == "rescale" and record["healing"][0]["trainable_parameters"] == 0
    reference = lp.load_model(str(original))
    data = lp.build_calibration(reference.tokenizer, str(corpus), samples=8, seq_len=64, sampling="contiguous")
    compensate(reference, [], "rescale", data, attention=[1, 3], mlp=[3])
    probe = data.input_ids[:2, :20]
    with torch.no_grad():
        torch.testing.assert_close(lp.load_model(str(out)).model(input_ids=probe).logits,
                                   reference.model(input_ids=probe).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    for bad in (["--attention", "1", "--compensate", "merge"],  # refused before the model loads
                ["--attention", "9", "--compensate", "rescale"],  # out of range: the config tells
                ["--attention", "1", "--layers", "1", "--compensate", "rescale"],
                ["--attention", "0,1,2,3,4,5", "--mlp", "0,1,2,3,4,5", "--compensate", "rescale"]):
        target = tmp_path / "refused"
        assert main(["prune", "--model", str(original), *bad, "--data", str(corpus), *CALIBRATION,
                     "--out", str(target)]) == 2, bad
        assert not target.exists(), bad
        assert capsys.readouterr().err.strip(), bad


def test_a_scored_branch_cut_is_repaired_with_rescale(tmp_path: Path) -> None:
    original = save_tiny_checkpoint(tmp_path / "original", "llama")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "scored"
    assert main(["prune", "--model", str(original), "--metric", "bi", "--granularity", "sublayer", "--remove", "25%",
                 "--compensate", "rescale", "--data", str(corpus), *CALIBRATION, "--out", str(out)]) == 0
    record = json.loads((out / "layerprune.json").read_text())
    (repair,) = record["repairs"]
    removed = {u for run in repair["runs"] for u in run["units"]}
    assert removed == set(record["recipe"]["selection"]["units"])
    assert all(run["s"] > 0 for run in repair["runs"])
