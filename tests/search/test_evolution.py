"""``layerprune search --algorithm evolution`` on tiny models.

A constructed model whose best cut is known (two layers that cancel each other; every single layer
and every other pair matters), where every heuristic selection misses it and evolution finds it;
the cached-prefix fitness against a full forward of the pruned model; the top-k KL against the exact
KL and its stated bound; reproducibility; the budget kept by every mutation; early stopping that
changes nothing; the recipe that replays the winner; bad input refused.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import random
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

import layerprune as lp
from layerprune.cli.main import main
from layerprune.data import CalibrationConfig
from layerprune.evaluation.efficiency import Workload
from layerprune.models.lineage import count_parameters
from layerprune.models.loading import LoadedModel
from layerprune.records import SCHEMA_DIR, schema_file
from layerprune.scoring import rescorer
from layerprune.searching import SearchConfig, SearchDocument
from layerprune.searching.candidates import candidate_metrics
from layerprune.searching.evolution import Evolution, UnitBudget, evolve, layer_budget
from layerprune.searching.fitness import CachedOriginal, TopK, exact_kl, kl_top_k, tail_error_bound
from layerprune.selection import STRATEGIES
from tests.conftest import FAMILIES
from tests.helpers import KL_FLOAT32_NOISE, record_text, reference_top_k_kl, search_folder, tiny_loaded, write_corpus

QUICK = Workload(prompt_len=8, new_tokens=2, repeats=1, warmup=0)
PAIR = (1, 4)
"""The constructed model's layers that cancel: removing both changes nothing, removing either is ruinous."""
MASSIVE, SIDE, REGULAR = 0, slice(1, 9), slice(9, 32)


def cancelling_pair_model() -> LoadedModel:
    """A 6-layer tiny llama whose best 2-layer cut is :data:`PAIR`, built to fool every heuristic.

    The residual stream holds one huge constant dimension (1000), so every layer's input has nearly
    the same norm. Layer 1 writes a vector into the side dimensions, which only the head reads, from
    its MLP that reads only the constant dimension; layer 4 is its copy with the output negated, so
    the two cancel (up to the 1e-4 by which the norm moves). Each looks important to every metric:
    a large change of the hidden state (bi, angular, block-cosine), large weights (magnitude; on
    dimensions nothing reads), a large loss when removed alone (ppl, taylor). The four regular
    layers change the regular dimensions moderately.
    """
    loaded = tiny_loaded("llama", 6, seed=3)
    model = loaded.model
    generator = torch.Generator().manual_seed(0)
    scale = 1000.0 / 32 ** 0.5  # the norms divide by about this: their weights give it back
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, MASSIVE], embed[:, SIDE] = 1000.0, 0.0
        embed[:, REGULAR] = torch.randn(embed.shape[0], 23, generator=generator)
        for index, layer in enumerate(model.model.layers):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.zero_()
                if index in PAIR:
                    norm.weight[MASSIVE], norm.weight[REGULAR] = 1.0, 500.0
                else:
                    norm.weight[REGULAR] = scale
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):  # nothing writes the constant or side dims
                writer.weight[MASSIVE] = 0.0
                writer.weight[SIDE] = 0.0
            if index in PAIR:  # heavy weights that do nothing: no value reaches o_proj; gate/up read dim 0 only
                layer.self_attn.v_proj.weight.zero_()
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj):
                    projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator))
                layer.mlp.gate_proj.weight[:, 1:] = 0.0
                layer.mlp.up_proj.weight[:, 1:] = 0.0
                layer.mlp.down_proj.weight.zero_()
            else:
                layer.self_attn.o_proj.weight.mul_(30.0)
                layer.mlp.down_proj.weight.mul_(30.0)
        first, second = (model.model.layers[i] for i in PAIR)
        second.mlp.gate_proj.weight.copy_(first.mlp.gate_proj.weight)
        second.mlp.up_proj.weight.copy_(first.mlp.up_proj.weight)
        first.mlp.down_proj.weight[SIDE] = torch.randn(8, 64, generator=generator) * 20
        second.mlp.down_proj.weight[SIDE] = -first.mlp.down_proj.weight[SIDE]
        model.model.norm.weight.zero_()
        model.model.norm.weight[1:] = scale
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    return loaded


def full_log_probs(model: torch.nn.Module, rows: lp.CalibrationSet) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return search_folder(tmp_path_factory.mktemp("evolution"), cancelling_pair_model())


def calibration(corpus: dict[str, Path]) -> CalibrationConfig:
    return CalibrationConfig(source=str(corpus["calibration"]), samples=8, seq_len=64)


@pytest.fixture(scope="module")
def evolved(constructed: dict[str, Path]) -> lp.SearchRecord:
    """Its one finalist, the best cut by fitness, is the winner (on this random model the held-out
    perplexity, which ranks several finalists, need not follow the KL to the original)."""
    return lp.search(str(constructed["model"]), remove=2, calibration=calibration(constructed),
                     rank_data=str(constructed["held_out"]), algorithm="evolution", generations=6, offspring=4,
                     fitness_rows=8, finalists=1, repairs=False, exhaustive=True, batch_size=2, rank_windows=4,
                     workload=QUICK, out=constructed["folder"] / "out", progress=False)


def test_the_constructed_best_cut_is_the_pair_and_every_heuristic_misses_it(constructed: dict[str, Path]) -> None:
    """The reference: the exact KL of all 15 cuts of 2 layers from full forwards of pruned copies, and
    every metric's selection under every strategy (the iterative ones of ppl and taylor included)."""
    loaded = lp.load_model(constructed["model"])
    rows = lp.build_calibration(loaded.tokenizer, str(constructed["calibration"]), samples=8, seq_len=64)
    original = full_log_probs(loaded.model, rows)
    kl = {}
    for cut in itertools.combinations(range(6), 2):
        working = loaded.copy()
        lp.prune(working, list(cut))
        kl[cut] = float(exact_kl(original.flatten(0, 1), full_log_probs(working.model, rows).flatten(0, 1)).mean())
    ranked = sorted(kl, key=kl.__getitem__)
    assert ranked[0] == PAIR and kl[PAIR] < 1e-4 < 0.05 < kl[ranked[1]]
    report = lp.score(loaded, rows, candidate_metrics(), batch_size=4)
    rescore = rescorer(loaded, rows, batch_size=4)
    chosen = {(metric, strategy): tuple(lp.select(report, 2, strategy, metric, rescore=rescore).remove)
              for metric in candidate_metrics() for strategy in STRATEGIES.names()}
    assert PAIR not in chosen.values(), chosen
    assert min(kl[cut] for cut in chosen.values()) > 0.05


def test_evolution_finds_the_cut_every_heuristic_misses(evolved: lp.SearchRecord) -> None:
    winner = evolved.winner.candidate
    assert winner.remove == list(PAIR) and winner.strategy == "evolution" and winner.repair is None
    evolution = evolved.to_json()["evolution"]
    assert evolution["heuristic_cuts"] >= 4 and evolution["best_heuristic_fitness"] > 0.05
    assert winner.fitness is not None and winner.fitness < 1e-4
    trace = evolution["trace"]
    assert [g["index"] for g in trace] == list(range(len(trace))) and evolution["generations_run"] == len(trace) - 1
    assert all(later["best_fitness"] <= earlier["best_fitness"] for earlier, later in itertools.pairwise(trace))
    for generation in trace:  # the cached prefix and the stops only save work
        assert generation["layer_tokens"] <= generation["prefix_free_layer_tokens"] <= generation["naive_layer_tokens"]


def test_the_evolved_output_folder_and_its_record(evolved: lp.SearchRecord) -> None:
    folder = evolved.out
    assert (folder / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((folder / "search.json").read_text())
    jsonschema.validate(document, json.loads((SCHEMA_DIR / schema_file(SearchDocument)).read_text()))
    assert document["algorithm"] == "evolution" and document["format_version"] == 4
    assert "Evolution:" in (folder / "search.md").read_text()
    old = json.loads(record_text("search.json"))  # an older file (no algorithm) still reads, as a heuristic search
    assert old["format_version"] < 3 and "algorithm" not in old
    assert "algorithm" not in old["options"]  # nor its options, which must not read as today's default
    read = SearchDocument.model_validate(old)
    assert read.algorithm == read.options.algorithm == "heuristic" != SearchConfig().algorithm


def test_the_recipe_replays_the_evolved_cut_to_identical_weights(evolved: lp.SearchRecord, constructed,
                                                                   tmp_path: Path) -> None:
    recipe = (evolved.out / "recipe.yaml").read_text()
    assert "layers:" in recipe and "score:" not in recipe  # replayed without searching or scoring
    replay = lp.run_recipe(evolved.out / "recipe.yaml", tmp_path / "replay", allowed_paths=[constructed["folder"]],
                           log=lambda line: None)
    expected, got = weights(evolved.out / "model"), weights(replay / "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cached_prefix_fitness_equals_a_full_forward_of_the_cut(family: str) -> None:
    loaded = tiny_loaded(family, 6)
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=4, seq_len=32)
    where = rows.attention_mask[:, :-1].bool() & rows.attention_mask[:, 1:].bool()
    original = full_log_probs(loaded.model, rows)[where]
    kl_fitness = CachedOriginal(loaded, rows, 4, "kl")
    ppl_fitness = CachedOriginal(loaded, rows, 4, "ppl")
    for cut in ((0, 1), (2, 5), (3,), (5,)):
        working = loaded.copy()
        lp.prune(working, list(cut))
        candidate = full_log_probs(working.model, rows)[where]
        expected_kl = reference_top_k_kl(original, candidate)
        expected_nll = float(-candidate.gather(-1, rows.input_ids[:, 1:][where][:, None]).sum())
        kl_score, ppl_score = kl_fitness.score(0, frozenset(cut)), ppl_fitness.score(0, frozenset(cut))
        assert kl_score.total == pytest.approx(expected_kl, rel=1e-4, abs=KL_FLOAT32_NOISE), cut
        assert ppl_score.total == pytest.approx(expected_nll, rel=1e-5), cut
        tokens = int(rows.attention_mask.sum())
        assert kl_score.layer_tokens == tokens * (6 - len(cut) - min(cut))  # from the first removed layer on


def test_the_top_k_kl_is_a_lower_bound_within_its_stated_error_bound() -> None:
    loaded = tiny_loaded("llama", 6)
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=4, seq_len=32)
    original = full_log_probs(loaded.model, rows).flatten(0, 1)
    working = loaded.copy()
    lp.prune(working, [1, 3])
    candidate = full_log_probs(working.model, rows).flatten(0, 1)
    exact = exact_kl(original, candidate)
    for k in (4, 16, 64):
        teacher = TopK.of(original, k)
        approximate = kl_top_k(teacher, candidate)
        error = exact - approximate
        assert bool((error >= -1e-6).all()), k  # coarse-graining the tail never raises the KL
        assert bool((error <= tail_error_bound(teacher, candidate) + 1e-6).all()), k
    whole = TopK.of(original, original.shape[-1])  # no tail: exact
    assert torch.allclose(kl_top_k(whole, candidate), exact, atol=1e-6)
    assert float(tail_error_bound(whole, candidate).abs().max()) == 0.0


def test_the_top_k_kl_reads_raw_logits_in_place_as_accurately_as_float64() -> None:
    """The fitness hands the head's float32 logits of a large vocabulary to :func:`kl_top_k` to consume:
    the result is the float64 top-k KL of the same distributions, in place or not, and a cut whose tail
    underflows float32 gets a large finite KL, not an infinite one."""
    generator = torch.Generator().manual_seed(5)
    original = torch.randn(64, 50_000, generator=generator, dtype=torch.float64) * 3
    candidate = original + 0.1 * torch.randn(64, 50_000, generator=generator, dtype=torch.float64) + 7.0
    teacher64 = TopK.of(torch.log_softmax(original, -1))
    expected = kl_top_k(teacher64, torch.log_softmax(candidate, -1))
    teacher = TopK(teacher64.log_probs.float(), teacher64.indices, teacher64.log_tail.float())
    logits = candidate.float()
    kept = logits.clone()
    assert torch.allclose(kl_top_k(teacher, logits).double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(logits, kept)  # not in place: the logits are left as they were
    consumed = kl_top_k(teacher, logits, in_place=True)
    assert torch.allclose(consumed.double(), expected, rtol=1e-4, atol=1e-6) and not torch.equal(logits, kept)
    underflowing = torch.full((1, 50_000), -1e4)
    underflowing[0, teacher.indices[0]] = 0.0  # all of the cut's mass on the original's top k
    far = kl_top_k(TopK(teacher.log_probs[:1], teacher.indices[:1], teacher.log_tail[:1]), underflowing)
    assert bool(far.isfinite().all()) and float(far) > float(teacher.log_tail[0].exp()) * 80


def test_the_error_bound_is_reached_by_the_worst_tail_it_allows() -> None:
    """A teacher whose tail is the bound's worst case (mass at the cap on the candidate's least likely
    tokens): the exact error equals the bound, so the bound is the tightest the stored numbers allow."""
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0, -2.0, -3.0, -4.0]]), dim=-1)
    top, cap = [0.5, 0.3], 0.08  # the teacher's top 2, and its tail's largest probability
    tail = [0.0, 0.0, 0.0, 0.04, 0.08, 0.08]  # 0.2 of tail mass: 0.08 on the two least likely, the rest next
    p = torch.tensor([top + tail]).log()
    teacher = TopK.of(p, 2)
    assert float(teacher.log_probs.min().exp()) == pytest.approx(top[1]) and cap < top[1]
    error = exact_kl(p, q) - kl_top_k(teacher, q)
    assert float(error) > 0
    capped = TopK(teacher.log_probs.clone(), teacher.indices, teacher.log_tail)
    capped.log_probs[0, 1] = math.log(cap)  # what the bound reads as the cap: p_k = the tail's largest
    assert float(tail_error_bound(capped, q)) == pytest.approx(float(error), rel=1e-5)


def test_every_mutation_keeps_the_budget() -> None:
    """Units are any hashables with a parameter count: here layers and sub-layer branches of unequal size."""
    units = {**{(i, "attention"): 4 for i in range(6)}, **{(i, "mlp"): 8 for i in range(6)}}
    budget = UnitBudget(units, target=24, tolerance=2)
    rng = random.Random(1)
    parent = budget.random_cut(rng)
    assert parent is not None and budget.fits(parent)
    for _ in range(300):
        child = budget.mutate(parent, rng)
        assert child is not None and child != parent and budget.fits(child)
        assert abs(budget.removed_parameters(child) - 24) <= 2
        parent = child
    layers = layer_budget([10] * 8, 2)  # equal layers: exactly 2 removed, always
    rng = random.Random(0)
    cut = frozenset({0, 1})
    for _ in range(100):
        cut = layers.mutate(cut, rng)
        assert cut is not None and len(cut) == 2
    assert not layers.fits(frozenset(range(8))) and not UnitBudget({0: 1}, 1).fits(frozenset({0}))


def run_evolution(original: CachedOriginal, seed: int) -> Evolution:
    return evolve(original, layer_budget([1] * 6, 2), [frozenset({4, 5})], generations=4, offspring=4, seed=seed,
                  clock=lambda: 0.0, keep_going=lambda seconds, what: True)


def test_the_same_seed_gives_the_same_run_and_early_stopping_changes_no_outcome(monkeypatch) -> None:
    loaded = tiny_loaded("llama", 6)
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=8, seq_len=32)
    original = CachedOriginal(loaded, rows, 2, "kl")
    first, again = run_evolution(original, 0), run_evolution(original, 0)
    assert first.parent == again.parent
    assert [g.best_fitness for g in first.trace] == [g.best_fitness for g in again.trace]
    assert sum(g.stopped_early for g in first.trace) > 0  # the stops below did happen
    extend = Evolution.extend
    monkeypatch.setattr(Evolution, "extend", lambda self, cut, upto, bar: extend(self, cut, upto, math.inf))
    unstopped = run_evolution(original, 0)
    assert unstopped.parent == first.parent
    assert [g.best_fitness for g in unstopped.trace] == pytest.approx([g.best_fitness for g in first.trace])
    assert sum(g.evaluations for g in unstopped.trace) > sum(g.evaluations for g in first.trace)


def test_the_time_budget_bounds_the_initial_population(monkeypatch) -> None:
    """On a slow machine the initial population is cut short too: each batch evaluation here takes one
    second of a fake clock, and a 20-second budget stops after the cut the next one would overrun."""
    loaded = tiny_loaded("llama", 6)
    rows = lp.build_calibration(loaded.tokenizer, "wiki-sample", samples=8, seq_len=32)
    original = CachedOriginal(loaded, rows, 2, "kl")  # 4 batches: a fully scored cut costs 4 s at most
    now = [0.0]
    score = CachedOriginal.score

    def slow_score(self, batch, cut):
        now[0] += 1.0
        return score(self, batch, cut)

    monkeypatch.setattr(CachedOriginal, "score", slow_score)
    asked: list[str] = []

    def keep_going(seconds: float, what: str) -> bool:
        asked.append(what)
        return now[0] + seconds <= 20

    run = evolve(original, layer_budget([1] * 6, 2), [frozenset({4, 5})], generations=4, offspring=12, seed=0,
                 clock=lambda: now[0], keep_going=keep_going)
    initial = run.trace[0]
    assert now[0] <= 20 and initial.left_out > 0 and initial.contenders + initial.left_out == 13
    assert run.parent is not None and len(run.trace) == 1  # no generation fits what was left
    assert "initial population" in asked[-2] and asked[-1] == "evolution generations 1..4"


def test_a_target_speedup_sets_the_count_every_evolved_cut_removes(constructed, monkeypatch) -> None:
    """``target_speedup`` is supported: the layer count it needs (timed; here fixed at 3, since the
    timing is not what is tested) is the evolution's budget, kept by every cut it scored."""
    search_module = importlib.import_module("layerprune.searching.search")  # the module, not the function
    monkeypatch.setattr(search_module, "layers_for_speedup", lambda loaded, target, workload: (3, 1.6))
    record = lp.search(str(constructed["model"]), target_speedup=1.5, calibration=calibration(constructed),
                       rank_data=str(constructed["held_out"]), algorithm="evolution", generations=2, offspring=2,
                       fitness_rows=4, finalists=2, repairs=False, batch_size=2, rank_windows=2, workload=QUICK,
                       progress=False)
    loaded = lp.load_model(str(constructed["model"]))
    layer = count_parameters(loaded.adapter.decoder_layers(loaded.model)[0])  # all six are the same size
    assert record.remove == 3 and all(len(t.candidate.remove) == 3 for t in record.tried)
    assert record.settings["evolution"]["budget_parameters"] == 3 * layer
    assert record.settings["budget"]["measured_decode_speedup_at_count"] == 1.6


@pytest.mark.parametrize(("flags", "reason"), [
    (["--remove", "6"], "would remove all 6 layers"),
    (["--generations", "0"], "--generations must be at least 1"),
    (["--offspring", "0"], "--offspring must be at least 1"),
    (["--fitness", "entropy"], "--fitness"),
    (["--algorithm", "genetic"], "--algorithm"),
])
def test_bad_evolution_input_exits_2_and_writes_nothing(flags: list[str], reason: str, constructed, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    try:
        code = main(["search", "--model", str(constructed["model"]), "--data", str(constructed["calibration"]),
                     "--rank-data", str(constructed["held_out"]), "--samples", "4", "--seq-len", "32", "--algorithm",
                     "evolution", "--out", str(out), *flags])
    except SystemExit as stop:  # argparse refuses a choice it lists itself
        code = stop.code
    assert code == 2
    assert reason in capsys.readouterr().err
    assert not out.exists()
