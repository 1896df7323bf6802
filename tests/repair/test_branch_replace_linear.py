"""``replace-linear`` (ReplaceMe) at a cut of attention and MLP branches: the fitted map against
``torch.linalg.lstsq`` on streams captured by independent hooks, the fold against the pruned model's
own stream after the cut (``(h_a - M) + M T``), the repaired cut closer to the original than the plain
one; refusals (a run at the first branch, a branch before the run already removed, a parallel-residual
family, merge) name the reason and, from the command line, exit 2 and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.cli.main import main
from layerprune.errors import UsageError
from layerprune.repair import branch_unit_runs, compensate
from layerprune.repair.linear import solve_linear_map
from layerprune.repair.statistics import collect_unit_statistics
from tests.helpers import save_tiny_checkpoint, tiny_loaded, write_corpus
from tests.repair.test_branch_rescale import (
    ATTENTION_ADDED,
    CALIBRATION,
    NUM_LAYERS,
    layers_of,
    rows,
    streams,
)

# What each family's attention adds to the residual (before Granite's residual_multiplier), written down here.
ATTENTION_OUTPUT = {**ATTENTION_ADDED, "granite": "self_attn.o_proj"}
FAMILIES = ("llama", "gemma3", "granite")
DIAGONAL = {"gemma3"}  # a norm follows each branch: ReplaceMe's diagonal map, folded into that norm
SCATTERED = (([], [1, 3], [3, 4]), [(2, 3), (6, 8), (9, 10)])  # the branch before each: mlp.0, mlp.2, attn.4
SINGLE_RUNS = {  # (whole layers, attention, MLP) -> the one removed run of units; none leaves a layer empty
    "attention after an MLP": (([], [3], []), (6, 7)),
    "MLP after an attention": (([], [], [3]), (7, 8)),
    "MLP and the next attention": (([], [3], [2]), (5, 7)),
}


def reference_map(branch: torch.Tensor, target: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """``argmin ||M T - Y||``: full by ``lstsq``, or channel by channel where ``T`` must be diagonal."""
    if diagonal:
        return torch.diag((branch * target).sum(0) / (branch * branch).sum(0))
    return torch.linalg.lstsq(branch, target).solution


def branch_and_target(states: list[torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = h_a - h_{a-1}`` (the branch before the run, as added to the residual) and ``Y = h_b - h_a + M``."""
    branch = states[start] - states[start - 1]
    return branch, states[end] - states[start] + branch


def unit_name(unit: int) -> str:
    return f"{('attn', 'mlp')[unit % 2]}.{unit // 2}"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_map_of_every_run_equals_lstsq_on_independently_captured_streams(family: str) -> None:
    cut, runs = SCATTERED
    loaded, data = tiny_loaded(family, NUM_LAYERS), rows()
    assert branch_unit_runs(loaded, *cut) == runs
    states = streams(loaded.model, family, data.input_ids, ATTENTION_OUTPUT)
    collected = collect_unit_statistics(loaded.model, loaded.adapter, runs,
                                        iter([(data.input_ids, data.attention_mask)]), linear=True)
    diagonal = family in DIAGONAL
    for (start, end), stats in zip(runs, collected):
        branch, target = branch_and_target(states, start, end)
        expected = reference_map(branch, target, diagonal)
        transform, _, _ = solve_linear_map(stats.gram, stats.cross, 0.0, diagonal=diagonal, label="run")
        assert stats.tokens == branch.shape[0]
        # what the map adds to the stream; an attention's output in these tiny models is close to rank
        # deficient, so its map itself is only well determined where the branch is an MLP
        torch.testing.assert_close(branch @ transform, branch @ expected, rtol=1e-5, atol=1e-6)
        if start % 2 == 0:  # an MLP before the run
            torch.testing.assert_close(transform, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cut", sorted(SINGLE_RUNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_fold_gives_the_stream_of_the_map_and_is_closer_than_the_plain_cut(family: str, cut: str) -> None:
    """After the repair the pruned model's stream after the cut is ``(h_a - M) + M T`` with ``T`` fitted
    here, and it is nearer the original's ``h_b`` than the plain cut's ``h_a - M`` on the calibration rows."""
    (layers, attention, mlp), (start, end) = SINGLE_RUNS[cut]
    original, repaired, data = tiny_loaded(family, NUM_LAYERS), tiny_loaded(family, NUM_LAYERS), rows()
    states = streams(original.model, family, data.input_ids, ATTENTION_OUTPUT)
    branch, target = branch_and_target(states, start, end)
    moved = branch @ reference_map(branch, target, family in DIAGONAL)  # what the map makes of the branch
    report = compensate(repaired, layers, "replace-linear", data, attention=attention, mlp=mlp)
    assert repaired.num_layers == NUM_LAYERS
    after: list[torch.Tensor] = []  # the removed run ends where layer end // 2 starts, or before its MLP,
    layers_of(repaired.model)[end // 2].register_forward_pre_hook(  # whose attention is then removed
        lambda module, args, kwargs: after.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        repaired.model(input_ids=data.input_ids)
    got = after[0].reshape(-1, after[0].shape[-1]).double()
    # within float32 rounding of the streams: a map off by 0.1% fails
    torch.testing.assert_close(got - states[start - 1], moved, rtol=0, atol=5e-4 * float(moved.abs().max()))
    repaired_error = float(((got - states[end]) ** 2).mean())
    plain_error = float(((states[start - 1] - states[end]) ** 2).mean())
    assert repaired_error < plain_error
    (run,) = report.runs
    assert run["units"] == [unit_name(unit) for unit in range(start, end)]
    assert run["folded_into"] == unit_name(start - 1)
    assert run["map"] == ("diagonal" if family in DIAGONAL else "full") and run["condition_number"] >= 1
    before, diagonal = ("MLP" if start % 2 == 0 else "attention"), family in DIAGONAL
    assert (f"post-{before} norm" if diagonal else f"{before} output projection") in report.summary


def test_a_whole_layer_cut_as_its_branches_gets_the_map_of_the_whole_layer_cut() -> None:
    """Layers 2-3 cut as layers (``M`` read at the MLP output) and as their four branches (``M`` the
    difference of two streams) fold the same map into the MLP of layer 1."""
    data = rows()
    as_layers, as_branches = tiny_loaded("llama", NUM_LAYERS), tiny_loaded("llama", NUM_LAYERS)
    first = compensate(as_layers, [2, 3], "replace-linear", data)
    second = compensate(as_branches, [], "replace-linear", data, attention=[2, 3], mlp=[2, 3])
    assert first.runs[0]["folded_into"] == second.runs[0]["folded_into"] == "mlp.1"
    torch.testing.assert_close(as_branches.model.model.layers[1].mlp.down_proj.weight,
                               as_layers.model.model.layers[1].mlp.down_proj.weight, rtol=1e-4, atol=1e-6)


def test_branch_cut_refusals_name_the_reason_and_change_nothing() -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    with pytest.raises(UsageError, match="first branch, attn.0"):
        compensate(loaded, [], "replace-linear", rows(), attention=[0, 2])
    with pytest.raises(UsageError, match="fewer than the hidden size 32"):
        compensate(loaded, [], "replace-linear", rows(1, 16), attention=[2])
    with pytest.raises(UsageError, match=r"whole layers only.*(rescale, replace-linear|replace-linear, rescale)"):
        compensate(loaded, [], "merge", None, attention=[2])
    assert loaded.num_layers == NUM_LAYERS and "repairs" not in loaded.lineage
    lp.prune(loaded, attention=[3])  # now the MLP of layer 3 follows no attention of its own
    with pytest.raises(UsageError, match="attn.3 was removed by an earlier cut"):
        compensate(loaded, [], "replace-linear", rows(), mlp=[3])
    parallel = tiny_loaded("gpt_neox", NUM_LAYERS)
    assert parallel.adapter.parallel_residual
    with pytest.raises(UsageError, match="parallel residual"):
        compensate(parallel, [], "replace-linear", rows(), attention=[2])


def test_prune_repairs_a_branch_cut_with_replace_linear_and_refusals_exit_2_writing_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = save_tiny_checkpoint(tmp_path / "original", "llama")
    parallel = save_tiny_checkpoint(tmp_path / "parallel", "gpt_neox")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "cut"
    assert main(["prune", "--model", str(original), "--attention", "1,3", "--mlp", "3", "--compensate",
                 "replace-linear", "--data", str(corpus), *CALIBRATION, "--out", str(out)]) == 0
    record = json.loads((out / "layerprune.json").read_text())
    (repair,) = record["repairs"]
    assert [(r["units"], r["folded_into"]) for r in repair["runs"]] == [(["attn.1"], "mlp.0"),
                                                                       (["attn.3", "mlp.3"], "mlp.2")]
    capsys.readouterr()
    for model, bad, reason in ((original, ["--attention", "0"], "first branch"),
                               (parallel, ["--attention", "2"], "parallel residual"),
                               (original, ["--mlp", "2"], None)):
        target = tmp_path / "refused"
        code = main(["prune", "--model", str(model), *bad, "--compensate", "merge" if reason is None
                     else "replace-linear", "--data", str(corpus), *CALIBRATION, "--out", str(target)])
        error = capsys.readouterr().err
        assert code == 2 and not target.exists(), bad
        assert (reason or "whole layers only") in error, error
