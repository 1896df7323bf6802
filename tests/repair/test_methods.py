"""Training-free repairs on tiny models of every family, each against an independent reference:
the statistics against ``output_hidden_states`` and ``torch.linalg.lstsq``, the folds against hooks
that apply the same map or scale at run time, merge against its formula, a reload against the
logits in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import layerprune as lp
from layerprune.errors import UsageError
from layerprune.healing import TrainingSet
from layerprune.models.architectures import adapter_for_config
from layerprune.models.loading import LoadedModel
from layerprune.models.tiny import TINY_FAMILIES, tiny_config
from layerprune.repair import MergeOptions, ReplaceLinearOptions, collect_run_statistics, compensate
from layerprune.repair.linear import cosine_distance, solve_linear_map
from layerprune.repair.statistics import collect_statistics
from tests.helpers import tiny_loaded

# post-norm models (OPT-350m) are refused by replace-linear and rescale: tested on their own
FAMILIES = [family for family in TINY_FAMILIES if not adapter_for_config(tiny_config(family, 2)).post_norm]
NUM_LAYERS = 6
CUT = [2, 3]
# What each family adds to the residual as its MLP branch, written down here independently of the adapters.
MLP_BRANCH = {"gpt2": "mlp", "opt": "fc2", "gpt_neox": "mlp", "gemma2": "post_feedforward_layernorm",
              "gemma3": "post_feedforward_layernorm"}
# What multiplies the MLP output before the residual addition, where not 1 (Granite's modeling code).
BRANCH_MULTIPLIER = {"granite": lambda config: config.residual_multiplier}
TIED = ("gemma2", "gemma3", "gpt2", "opt")


def loaded_tiny(family: str, seed: int = 0) -> LoadedModel:
    return tiny_loaded(family, NUM_LAYERS, seed=seed)


def rows(count: int = 12, seq_len: int = 16, seed: int = 0) -> TrainingSet:
    generator = torch.Generator().manual_seed(seed)
    return TrainingSet.from_ids(torch.randint(0, 256, (count, seq_len), generator=generator))


def layers_of(loaded: LoadedModel) -> torch.nn.ModuleList:
    return loaded.adapter.decoder_layers(loaded.model)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def stacked_pairs(loaded: LoadedModel, start: int, end: int, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every token's ``(M, h_a, h_b)`` for the run ``[start, end)``, read with ``output_hidden_states``
    (its entries ``i < num_layers`` are the inputs of layer ``i``) and one hook on the MLP branch."""
    family = loaded.model.config.model_type.removesuffix("_text")
    branch = layers_of(loaded)[start - 1].get_submodule(MLP_BRANCH.get(family, "mlp"))
    seen: list[torch.Tensor] = []
    handle = branch.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    hidden = states[start].shape[-1]
    added = seen[0] * BRANCH_MULTIPLIER.get(family, lambda config: 1.0)(loaded.model.config)
    return tuple(t.reshape(-1, hidden).double() for t in (added, states[start], states[end]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_map_equals_lstsq_on_the_stacked_pairs(family: str) -> None:
    loaded, data = loaded_tiny(family), rows()
    (stats,) = collect_statistics(loaded.model, loaded.adapter, [(2, 4)], iter([(data.input_ids, data.attention_mask)]),
                                  linear=True)
    branch, entering, leaving = stacked_pairs(loaded, 2, 4, data.input_ids)
    expected = torch.linalg.lstsq(branch, leaving - entering + branch).solution
    transform, condition, _ = solve_linear_map(stats.gram, stats.cross, 0.0, diagonal=False, label="2-3")
    assert stats.tokens == branch.shape[0]
    torch.testing.assert_close(transform, expected, rtol=1e-6, atol=1e-8)
    assert condition == pytest.approx(float(torch.linalg.cond(branch.T @ branch)), rel=1e-6)


def test_padding_never_enters_the_statistics() -> None:
    """Two batches that differ only in what the padded positions hold give the same sums."""
    loaded, data = loaded_tiny("llama"), rows()
    mask = torch.ones_like(data.input_ids)
    mask[:, 10:] = 0
    other = data.input_ids.clone()
    other[:, 10:] = 7
    sums = [collect_statistics(loaded.model, loaded.adapter, [(2, 4)], iter([(ids, mask)]), linear=True)[0]
            for ids in (data.input_ids, other)]
    assert sums[0].tokens == int(mask.sum())
    for name in ("gram", "cross", "abs_in", "abs_out"):
        torch.testing.assert_close(getattr(sums[0], name), getattr(sums[1], name), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_linear_fold_equals_the_map_applied_by_a_hook(family: str) -> None:
    original, repaired, plain, data = loaded_tiny(family), loaded_tiny(family), loaded_tiny(family), rows()
    branch, entering, leaving = stacked_pairs(original, 2, 4, data.input_ids)
    target = leaving - entering + branch
    gemma = family.startswith("gemma")
    if gemma:  # a norm follows the MLP: the least-squares diagonal map, channel by channel
        expected = torch.diag((branch * target).sum(0) / (branch * branch).sum(0))
    else:
        expected = torch.linalg.lstsq(branch, target).solution
    compensate(repaired, CUT, "replace-linear", data)
    lp.prune(plain, CUT)
    hooked = layers_of(plain)[1].get_submodule(MLP_BRANCH.get(family, "mlp"))
    hooked.register_forward_hook(lambda module, args, output: (output.double() @ expected).to(output.dtype))
    probe = rows(3, 12, seed=5).input_ids
    torch.testing.assert_close(logits(repaired.model, probe), logits(plain.model, probe), rtol=1e-4, atol=1e-4)
    assert lp.info(repaired)["parameters"] == lp.info(plain)["parameters"]
    (run,) = repaired.lineage["repairs"][0]["runs"]
    assert (run["start"], run["end"], run["map"]) == (2, 4, "diagonal" if gemma else "full")
    assert run["condition_number"] > 1


def test_replace_linear_refuses_what_it_cannot_fold_or_solve() -> None:
    with pytest.raises(UsageError, match="starts at layer 0"):
        compensate(loaded_tiny("llama"), [0, 1], "replace-linear", rows())
    with pytest.raises(UsageError, match="fewer than the hidden size 32"):
        compensate(loaded_tiny("llama"), CUT, "replace-linear", rows(1, 16))
    same_token = TrainingSet.from_ids(torch.full((4, 16), 97))  # every position sees the same token: rank 1
    with pytest.raises(UsageError, match="singular.*--ridge"):
        compensate(loaded_tiny("llama"), CUT, "replace-linear", same_token)
    compensate(loaded_tiny("llama"), CUT, "replace-linear", same_token, options=ReplaceLinearOptions(ridge=1e-3))
    with pytest.raises(UsageError, match="^solver .adam. is not a choice"):
        ReplaceLinearOptions(solver="adam")


def test_a_dead_channel_of_a_diagonal_map_keeps_factor_one_and_only_an_all_dead_branch_is_refused() -> None:
    """Diagonal least squares is one 1x1 problem per channel: a channel the branch never drives has
    no say in the loss, so it keeps its weight; the others get sum(m y) / sum(m m)."""
    generator = torch.Generator().manual_seed(0)
    branch = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    branch[:, 2] = 0
    target = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    transform, condition, dead = solve_linear_map(branch.T @ branch, branch.T @ target, 0.0, diagonal=True, label="3-4")
    expected = (branch * target).sum(0) / (branch * branch).sum(0)
    expected[2] = 1.0
    torch.testing.assert_close(transform, torch.diag(expected))
    assert dead == 1 and condition >= 1
    with pytest.raises(UsageError, match="zero on every calibration token"):
        solve_linear_map(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64), 0.0,
                         diagonal=True, label="3-4")


def test_a_scattered_cut_is_repaired_run_by_run_from_one_pass() -> None:
    data = rows()
    together = loaded_tiny("llama")
    compensate(together, [1, 3, 4], "replace-linear", data)
    one_by_one = loaded_tiny("llama")
    reference = loaded_tiny("llama")
    for start, end in ((1, 2), (3, 5)):  # each run's map from the original, folded into the layer before it
        branch, entering, leaving = stacked_pairs(reference, start, end, data.input_ids)
        transform = torch.linalg.lstsq(branch, leaving - entering + branch).solution
        projection = layers_of(one_by_one)[start - 1].mlp.down_proj
        with torch.no_grad():
            projection.weight.copy_((transform.T @ projection.weight.double()).float())
    lp.prune(one_by_one, [1, 3, 4])
    probe = rows(3, 12, seed=5).input_ids
    torch.testing.assert_close(logits(together.model, probe), logits(one_by_one.model, probe), rtol=1e-4, atol=1e-4)
    assert [(r["start"], r["end"]) for r in together.lineage["repairs"][0]["runs"]] == [(1, 2), (3, 5)]


@pytest.mark.parametrize("method", ["replace-linear", "rescale"])
def test_statistics_shared_by_many_cuts_give_the_weights_of_each_cut_alone(method: str) -> None:
    """A search fits every candidate from one pass over runs that share starts and ends, overlap,
    and (for rescale) start at layer 0: each cut must get exactly the weights of its own pass."""
    data = rows()
    cuts = [[1, 2], [1, 2, 3], [2, 3], [3, 4], [1, 3, 4]] + ([[0, 1]] if method == "rescale" else [])
    runs = [(1, 3), (1, 4), (2, 4), (3, 5), (1, 2)] + ([(0, 2)] if method == "rescale" else [])
    shared = collect_run_statistics(loaded_tiny("llama"), runs, data, batch_size=5)
    for cut in cuts:
        alone, together = loaded_tiny("llama"), loaded_tiny("llama")
        compensate(alone, cut, method, data, batch_size=5)
        compensate(together, cut, method, data, batch_size=5, statistics=shared)
        expected, got = alone.model.state_dict(), together.model.state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), (method, cut)


def test_the_cosine_solver_starts_from_least_squares_and_lowers_the_cosine_distance() -> None:
    data = rows()
    loaded = loaded_tiny("llama")
    (stats,) = collect_statistics(loaded.model, loaded.adapter, [(2, 4)], iter([(data.input_ids, data.attention_mask)]),
                                  linear=True, keep_tokens=True)
    start, _, _ = solve_linear_map(stats.gram, stats.cross, 0.0, diagonal=False, label="2-3")
    tokens = tuple(torch.cat([batch[i] for batch in stats.kept]) for i in range(3))
    compensate(loaded, CUT, "replace-linear", data, options=ReplaceLinearOptions(solver="cosine", cosine_steps=40))
    (run,) = loaded.lineage["repairs"][0]["runs"]
    assert run["cosine_distance_before"] == pytest.approx(float(cosine_distance(start.float(), tokens)), rel=1e-5)
    assert run["cosine_distance_after"] < run["cosine_distance_before"]
    assert run["cosine_steps"] == 40 and run["cosine_seconds"] >= 0


def magnitude_ratio(loaded: LoadedModel, start: int, end: int, ids: torch.Tensor) -> float:
    """Prune&Comp's ``s`` from ``output_hidden_states``, whose last entry is final-normed: the last
    layer's own output is read with a hook instead."""
    last: list[torch.Tensor] = []
    handle = layers_of(loaded)[-1].register_forward_hook(
        lambda module, args, output: last.append(output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        states = [*loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]]
    handle.remove()
    states.append(last[0])
    hidden = states[0].shape[-1]
    entering, leaving = (states[i].reshape(-1, hidden).double().abs().mean(0) for i in (start, end))
    return float((leaving / entering).mean())


def without_norm_epsilon(loaded: LoadedModel) -> LoadedModel:
    """Norms with epsilon 0 are exactly scale-invariant, so the fold must match the reference to rounding."""
    for module in loaded.model.modules():
        for name in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return loaded


SHAPES = [(family, CUT) for family in FAMILIES] + [
    (family, cut) for family in ("llama", "gemma3", "gpt2", "gpt_neox") for cut in ([1, 3, 4], [0, 1], [4, 5])]


@pytest.mark.parametrize(("family", "cut"), SHAPES, ids=[f"{f}-{'.'.join(map(str, c))}" for f, c in SHAPES])
def test_rescale_equals_scaling_the_stream_at_the_cut(family: str, cut: list[int]) -> None:
    original, repaired, plain = (without_norm_epsilon(loaded_tiny(family)) for _ in range(3))
    data = rows()
    runs = [(1, 2), (3, 5)] if cut == [1, 3, 4] else [(cut[0], cut[-1] + 1)]
    scales = [magnitude_ratio(original, start, end, data.input_ids) for start, end in runs]
    compensate(repaired, cut, "rescale", data)
    lp.prune(plain, cut)
    kept = [i for i in range(NUM_LAYERS) if i not in cut]
    for (_, end), scale in zip(runs, scales):  # multiply the stream entering the first layer after the cut
        after_cut = layers_of(plain)[kept.index(end)] if end < NUM_LAYERS else plain.model.get_submodule(
            plain.adapter.final_norm)
        after_cut.register_forward_pre_hook(
            lambda module, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs) if args else
            (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}), with_kwargs=True)
    probe = rows(3, 12, seed=5).input_ids
    torch.testing.assert_close(logits(repaired.model, probe), logits(plain.model, probe), rtol=1e-4, atol=1e-4)
    assert [run["s"] for run in repaired.lineage["repairs"][0]["runs"]] == pytest.approx(scales, rel=1e-6)
    head, embeddings = repaired.model.get_output_embeddings().weight, repaired.model.get_input_embeddings().weight
    assert torch.equal(embeddings, original.model.get_input_embeddings().weight)
    assert torch.equal(head, original.model.get_output_embeddings().weight)
    if family in TIED:
        assert head.data_ptr() == embeddings.data_ptr()


def test_rescale_refuses_a_post_norm_model() -> None:
    loaded = tiny_loaded("opt_post_norm", NUM_LAYERS)
    with pytest.raises(UsageError, match="do_layer_norm_before=False"):
        compensate(loaded, CUT, "rescale", rows())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_merge_equals_the_laco_formula(family: str, weight: float) -> None:
    original, merged = loaded_tiny(family), loaded_tiny(family)
    compensate(merged, CUT, "merge", None, options=MergeOptions(merge_weight=weight))
    source = {name: p.detach().double() for name, p in layers_of(original)[1].named_parameters()}
    removed = [dict(layers_of(original)[i].named_parameters()) for i in CUT]
    for name, parameter in layers_of(merged)[1].named_parameters():
        expected = source[name] + weight * sum(layer[name].double() - source[name] for layer in removed)
        torch.testing.assert_close(parameter.double(), expected, rtol=0, atol=1e-6)
    for index in (0, 2, 3):  # the layers that were not merged into are untouched
        kept = layers_of(original)[[0, 4, 5][[0, 2, 3].index(index)]]
        for (_, a), (_, b) in zip(kept.named_parameters(), layers_of(merged)[index].named_parameters()):
            assert torch.equal(a, b)
    with pytest.raises(UsageError, match="starts at layer 0"):
        compensate(loaded_tiny(family), [0], "merge", None)


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = model(input_ids=ids).logits.tolist()
print(json.dumps(out))
"""


def test_repaired_checkpoints_reload_in_a_fresh_process_with_the_same_logits(tmp_path) -> None:
    probe = rows(2, 10, seed=3).input_ids
    expected = {}
    for family, method in (("llama", "replace-linear"), ("gemma3", "replace-linear"), ("gpt2", "rescale"),
                           ("qwen2", "merge")):
        loaded = loaded_tiny(family)
        compensate(loaded, CUT, method, rows() if method != "merge" else None)
        folder = str(lp.save(loaded, tmp_path / f"{family}-{method}"))
        expected[folder] = logits(loaded.model, probe)
        record = json.loads((tmp_path / f"{family}-{method}" / "layerprune.json").read_text())
        assert record["repairs"][0]["method"] == method and record["removed_layers"] == CUT
    result = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(probe.tolist()), *expected],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, values in expected.items():
        torch.testing.assert_close(torch.tensor(reloaded[folder]), values, rtol=1e-5, atol=1e-5)
