"""benchmarks/sublayers.py without a real model or a search: the cuts it chooses from a search's record,
the export layer counts it reports of a tiny cut, and the docs section rendered
from a fixed saved result, cells not run saying so."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

import layerprune as lp
from tests.helpers import script_module, tiny_loaded

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sublayers.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return script_module(SCRIPT, "sublayers_under_test")


def _tried(ppl: float, layers: list[int], attention: list[int] = (), mlp: list[int] = (), repair: str | None = None,
           dropped: bool = False, parameters: int = 700) -> dict:
    return {"removed_layers": layers, "removed_attention": list(attention), "removed_mlp": list(mlp),
            "granularity": "sublayer" if attention or mlp else "layer", "metric": "bi", "strategy": "independent",
            "repair": repair, "held_out_ppl": ppl, "dropped_early": dropped, "parameters": parameters}


def test_the_best_plain_and_repaired_cut_of_each_kind_is_chosen(bench) -> None:
    tried = [_tried(30.0, [5]), _tried(25.0, [6]), _tried(20.0, [6], repair="rescale"),
             _tried(10.0, [], attention=[4], dropped=True), _tried(22.0, [], attention=[4, 5], mlp=[3]),
             _tried(21.0, [], attention=[2])]
    chosen = bench.choose(tried)
    assert set(chosen) == {"whole layers, plain", "whole layers, repaired", "sub-layer, plain"}
    assert chosen["whole layers, plain"]["removed_layers"] == [6]
    assert chosen["sub-layer, plain"]["removed_attention"] == [2]  # the dropped one has only a running ppl
    # a kind the search only dropped early is still chosen, its lowest running perplexity first
    dropped = bench.choose([_tried(30.0, [5]), _tried(900.0, [], attention=[1], dropped=True),
                            _tried(400.0, [], attention=[2], dropped=True)])
    assert dropped["sub-layer, plain"]["removed_attention"] == [2] and dropped["sub-layer, plain"]["dropped_early"]


def test_export_layers_counts_repacked_layers_and_zero_partners(bench) -> None:
    loaded = tiny_loaded("llama", 4)
    assert bench.export_layers(loaded)["zero_partners"] == 0
    lp.prune(loaded, attention=[1], mlp=[2])
    layers = bench.export_layers(loaded)
    # attention 0+MLP 0, (zero attention)+MLP 1, attention 2+(zero MLP), attention 3+MLP 3
    assert (layers["transformers"], layers["zero_partners"]) == (4, 2)
    assert layers["gguf"].startswith("n/a: llama.cpp's deci drops the attention of a layer without MLP")


def _save(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": 12.0, "load_before": 1.5, "date": "2026-12-06T23:00+00:00", **value}))


def test_render_reads_the_cells_run_and_says_which_are_not(bench, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    model, limit = "smollm2-135m", 40
    reference = {"ppl": 20.0, "ppl_ci95": [19.0, 21.0], "correct": {"a": [1] * 10, "b": [1, 0] * 5}}
    _save(tmp_path / model / "environment.json", {"machine": "x86_64, 2 cores", "versions": "torch 2"})
    _save(tmp_path / model / f"original-test-{limit}.json", reference)
    layers = {"transformers": 30, "zero_partners": 0, "decilm": 30, "gguf": 30}
    _save(tmp_path / model / "original-structure.json", {"kv_bytes": {"256": 100.0, "2048": 100.0}, "layers": layers})
    whole, branch = _tried(30.0, [6]), _tried(25.0, [], attention=[2, 3])
    found = {"minutes": 6, "num_layers": 30, "remove": 8, "branch_parameters": 800, "parameters": 1000,
             "decoder_parameters": 900, "original_ppl": 18.0, "shortfall": None, "tried": [whole, branch],
             "chosen": {"whole layers, plain": whole, "sub-layer, plain": branch},
             "skipped_repairs": [{"kind": "sub-layer", "repair": "rescale", "reason": "it removes single branches"}],
             "not_tried": []}
    where = bench.budget_dir(model, "25%", 16, 6)
    _save(where / "search.json", found)
    _save(bench.budget_dir(model, "25%", 16, 3) / "search.json", {**found, "minutes": 3})  # a shorter search
    reads = {"whole layers, plain": {"ppl": 40.0, "ppl_ci95": [38.0, 42.0], "correct": {"a": [1] * 10, "b": [0] * 10}},
             "sub-layer, plain": {"ppl": 35.0, "ppl_ci95": [33.0, 37.0], "correct": {"a": [1] * 10, "b": [1, 0] * 5}}}
    for slot, got in reads.items():
        _save(bench.read_path(where, limit, slot),
              {**got, "retained": bench.retained_performance(reference["correct"], got["correct"])})
    structures = {"layers 6": {"kv_bytes": {"256": 90.0, "2048": 90.0}, "flop_ideal": {"256": 1.1, "2048": 1.2},
                               "layers": {**layers, "decilm": 29, "gguf": 29, "transformers": 29}},
                  "attention of 2,3": {"kv_bytes": {"256": 80.0, "2048": 80.0},
                                       "flop_ideal": {"256": 1.05, "2048": 1.1},
                                       "layers": {**layers, "transformers": 30, "zero_partners": 2}}}
    _save(where / "structure.json", {"structures": structures})
    text = bench.render(["smollm2-135m", "gemma3-270m"], ["12%", "25%"], 16, limit)
    assert "search 6 min" in text and "search 3 min" not in text  # a budget shows its longest search
    assert "| sub-layer, repaired | no repair applied (the search: it removes single branches) |" in text
    assert "| attention of 2,3 | 80 / 80 | 1.05 / 1.10 | not run | 30 (2 zero partners) / 30 / 30 |" in text
    assert "**12%**: not run." in text and "#### gemma3-270m\n\nnot run." in text
    assert "test reading 24 s for 2 of 2 cuts (load before 1.5, 1.5); structure 12 s" in text
    assert "timing not run" in text  # the cost line of the 25% cell
    reading = text.split("Where sub-layers win")[1]
    assert "smollm2-135m at 25%: on test perplexity sub-layers win (sub-layer, plain 35.00 against whole layers, " \
           "plain 40.00)" in reading
    assert "higher for sub-layers" in reading and "measured speed-up not run" in reading
