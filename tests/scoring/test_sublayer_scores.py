"""Scoring at sub-layer granularity: every attention and MLP branch a unit (``attn.i``, ``mlp.i``),
checked against references that never touch layerprune's hooks; selection by a parameter budget."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.errors import OptionError, UsageError
from layerprune.models.architectures import adapter_for
from layerprune.scoring import MetricResult, ScoreConfig, ScoreReport, rescorer, score
from layerprune.selection import select
from tests.conftest import FAMILIES
from tests.helpers import tiny_loaded, zeroing_branches

NUM_LAYERS = 4
PARALLEL = {"cohere", "gpt_neox"}  # both branches read the layer's input
SEQUENTIAL = [f for f in FAMILIES if f not in PARALLEL | {"opt_post_norm"}]


def _rows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(seed))


def _states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer (transformers' own hidden states, all but the last,
    which is final-normed)."""
    with torch.no_grad():
        return list(model(ids, output_hidden_states=True).hidden_states[:-1])


def _bi(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_branch_bi_compares_the_stream_before_and_after_each_branch(family: str) -> None:
    """The state after layer i's attention is what layer i outputs with its MLP zeroed; so the
    reference needs only transformers' hidden states and zeroed outputs."""
    loaded = tiny_loaded(family, NUM_LAYERS)
    ids = _rows()
    report = score(loaded, ids, "bi", granularity="sublayer")
    result = report.results["bi"]
    assert result.units == [f"{kind}.{i}" for i in range(NUM_LAYERS) for kind in ("attn", "mlp")]
    states = _states(loaded.model, ids)
    for i in range(NUM_LAYERS - 1):  # the last layer's output is not among the hidden states
        with zeroing_branches(loaded.model, mlp=[i]):
            middle = _states(loaded.model, ids)[i + 1]
        assert result.importance[2 * i] == pytest.approx(_bi(states[i], middle), abs=1e-5)
        assert result.importance[2 * i + 1] == pytest.approx(_bi(middle, states[i + 1]), abs=1e-5)


def _removal_ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "opt"])
def test_branch_ppl_is_the_perplexity_without_the_branch(family: str) -> None:
    """Parallel-residual families (GPT-NeoX) too: removal needs no state between the branches."""
    loaded = tiny_loaded(family, NUM_LAYERS)
    ids = _rows()
    result = score(loaded, ids, "ppl", granularity="sublayer").results["ppl"]
    for position, unit in enumerate(result.units):
        kind, layer = unit.split(".")
        cut = copy.deepcopy(loaded)
        lp.prune(cut, attention=[int(layer)] if kind == "attn" else [], mlp=[int(layer)] if kind == "mlp" else [])
        assert result.importance[position] == pytest.approx(_removal_ppl(cut.model, ids), rel=1e-4), unit


def test_a_model_already_cut_by_branch_scores_the_branches_it_has() -> None:
    loaded = tiny_loaded("llama", NUM_LAYERS)
    lp.prune(loaded, attention=[1], mlp=[2])
    report = score(loaded, _rows(), "bi,angular", granularity="sublayer")
    assert report.units == ["attn.0", "mlp.0", "mlp.1", "attn.2", "attn.3", "mlp.3"]
    assert set(report.unit_parameters) == set(report.units)
    layers = adapter_for(loaded.model).decoder_layers(loaded.model)
    assert report.unit_parameters["attn.0"] + report.unit_parameters["mlp.0"] == sum(
        p.numel() for p in layers[0].parameters())
    assert report.results["angular"].importance == pytest.approx(report.results["angular"].values[1])


@pytest.mark.parametrize(("family", "metrics", "error", "message"), [
    ("gpt_neox", "bi", UsageError, "parallel residual"),
    ("opt_post_norm", "ppl", UsageError, "post-norm"),
    ("llama", "taylor", OptionError, "whole layers only"),
])
def test_branch_scores_that_cannot_be_told_apart_are_refused(family: str, metrics: str, error: type,
                                                              message: str) -> None:
    with pytest.raises(error, match=message):
        score(tiny_loaded(family, NUM_LAYERS), _rows(), metrics, granularity="sublayer")


def _report(importance: list[float], parameters: list[int]) -> ScoreReport:
    units = [f"{kind}.{i}" for i in range(len(importance) // 2) for kind in ("attn", "mlp")]
    result = MetricResult("bi", importance, importance, "", units=units)
    return ScoreReport("m", len(units) // 2, 0, list(range(len(units) // 2)), {}, {"bi": result},
                       ScoreConfig(granularity="sublayer"), dict(zip(units, parameters, strict=True)))


def test_a_share_counts_decoder_parameters() -> None:
    # attention 1 part, MLP 2 parts: a layer is 3 parts, 4 layers 12; 25% is 3 parts
    report = _report([0.1, 0.9, 0.2, 0.05, 0.8, 0.7, 0.3, 0.6], [1, 2] * 4)
    chosen = select(report, "25%")
    assert chosen.units == ["attn.0", "mlp.1"]  # mlp.1 (2) then attn.0 (1): 3 parts; attn.1 would overshoot
    assert (chosen.branches("attention"), chosen.branches("mlp"), chosen.remove) == ([0], [1], [])
    assert select(report, 1).units == chosen.units, "N layers' worth: the same budget as N/L of them"
    assert json.loads(json.dumps(chosen.to_json()))["attention"] == [0]


def test_iterative_branch_selection_rescores_after_each_removal() -> None:
    report = _report([0.1, 0.9, 0.2, 0.05], [1, 1, 1, 1])
    asked: list[list[str]] = []

    def rescore(metric: str, removed: list[str]) -> MetricResult:
        asked.append(removed)
        kept = [u for u in report.units if u not in removed]
        values = [0.0 if u == "attn.0" else 1.0 for u in kept]  # attn.0 now matters least
        return MetricResult(metric, values, values, "", units=kept)

    chosen = select(report, "50%", "iterative", rescore=rescore)
    assert chosen.units == ["attn.0", "mlp.1"] and asked == [["mlp.1"], ["mlp.1", "attn.0"]]
    assert [step["removed"] for step in chosen.steps] == ["mlp.1", "attn.0"]
    with pytest.raises(OptionError, match="runs of whole layers"):
        select(report, "25%", "consecutive")


def test_iterative_rescoring_names_branches_in_the_numbering_first_scored() -> None:
    """After a layer loses both branches the rest renumber; the re-scores' units must not."""
    loaded = tiny_loaded("llama", NUM_LAYERS)
    rows = _rows()
    rescore = rescorer(loaded, rows, granularity="sublayer")
    result = rescore("bi", ["attn.1", "mlp.1"])
    assert result.units == ["attn.0", "mlp.0", "attn.2", "mlp.2", "attn.3", "mlp.3"]
    reference = copy.deepcopy(loaded)
    lp.prune(reference, [1])
    assert result.importance == pytest.approx(score(reference, rows, "bi", granularity="sublayer")
                                              .results["bi"].importance)
    assert loaded.num_layers == NUM_LAYERS


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("branch-scores") / "llama", "llama", 6)


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    return path


def test_cli_prunes_the_branches_a_metric_chooses(llama_dir: Path, tmp_path: Path, capsys) -> None:
    from layerprune.cli.main import main

    out = tmp_path / "cut"
    data = ["--data", str(_data(tmp_path)), "--samples", "4", "--seq-len", "16"]
    assert main(["score", "--model", str(llama_dir), "--metrics", "bi", "--granularity", "sublayer",
                 "--remove", "25%", "--output", str(tmp_path / "scores.json"), *data]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["units"]) == 12 and scores["config"]["granularity"] == "sublayer"
    assert main(["prune", "--model", str(llama_dir), "--metric", "bi", "--granularity", "sublayer",
                 "--remove", "25%", "--out", str(out), *data]) == 0
    record = json.loads((out / "layerprune.json").read_text())
    chosen = scores["selection"]
    assert record["recipe"]["selection"]["units"] == chosen["units"]
    removed = {("attn", i) for i in record["removed_attention"]} | {("mlp", i) for i in record["removed_mlp"]}
    removed |= {(kind, i) for i in record["removed_layers"] for kind in ("attn", "mlp")}
    assert removed == {(u.split(".")[0], int(u.split(".")[1])) for u in chosen["units"]}


@pytest.mark.parametrize(("flags", "message"), [
    (["--metric", "bi", "--granularity", "sublayer", "--remove", "25%", "--strategy", "consecutive"],
     "runs of whole layers"),
    (["--metric", "taylor", "--granularity", "sublayer", "--remove", "25%"], "whole layers only"),
    (["--metric", "bi", "--granularity", "sublayer", "--remove", "25%", "--compensate", "merge"],
     "whole layers only"),
    (["--metric", "bi", "--granularity", "sublayer", "--remove", "25%", "--compensate", "rescale", "--iterative"],
     "--strategy"),
])
def test_cli_refuses_bad_branch_selections_with_nothing_written(llama_dir: Path, tmp_path: Path, capsys,
                                                               flags: list[str], message: str) -> None:
    from layerprune.cli.main import main

    out = tmp_path / "out"
    data = ["--data", str(_data(tmp_path)), "--samples", "4", "--seq-len", "16"]
    assert main(["prune", "--model", str(llama_dir), *flags, "--out", str(out), *data]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_branch_scores_of_a_family_whose_branches_cannot_be_told_apart(tmp_path: Path, capsys) -> None:
    from layerprune.cli.main import main
    from tests.helpers import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "opt", "opt_post_norm", NUM_LAYERS)
    capsys.readouterr()
    output = tmp_path / "scores.json"
    assert main(["score", "--model", str(model), "--metrics", "bi", "--granularity", "sublayer", "--output",
                 str(output), "--data", str(_data(tmp_path)), "--samples", "2", "--seq-len", "16"]) == 2
    error = capsys.readouterr().err
    assert "post-norm" in error and len(error.strip().splitlines()) == 1
    assert not output.exists() and not output.with_suffix(".png").exists()
