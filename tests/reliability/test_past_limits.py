"""Values past a model's or a task's limits: one line and exit 2 before anything is written, never an
IndexError or ValueError from deep inside transformers or lm-eval; a model whose weights hold NaN is
evaluated and plotted, its perplexity reported as not a number."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import save_tiny_checkpoint, write_corpus
from tests.reliability.conftest import CliResult, assert_refused, snapshot

Cli = Callable[..., CliResult]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 has learned positions (a table of 256 here): past it, indexing fails."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gpt2") / "model", "gpt2", 4)


def test_generation_past_the_context_is_refused_before_anything_is_written(gpt2_dir: Path, cli: Cli,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(cli("prune", "--model", gpt2_dir, "--layers", "1", "--out", out, "--generate", "hi",
                       "--max-new-tokens", "400"), "--max-new-tokens 400", "context of 256")
    assert not out.exists()
    assert cli("prune", "--model", gpt2_dir, "--layers", "1", "--out", out, "--generate", "hi",
               "--max-new-tokens", "4").code == 0


def test_an_efficiency_workload_past_the_context_is_refused_before_loading(gpt2_dir: Path, cli: Cli,
                                                                         tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    assert_refused(cli("eval", "--model", gpt2_dir, "--efficiency", "--prompt-len", "300", "--output",
                       tmp_path / "e.json"), "--prompt-len 300", "256 tokens")
    assert snapshot(tmp_path) == before


def test_more_few_shot_examples_than_the_task_holds_are_refused(gpt2_dir: Path, cli: Cli, tmp_path: Path) -> None:
    assert_refused(cli("eval", "--model", gpt2_dir, "--tasks", "lp_sentiment_rt", "--limit", "2",
                       "--num-fewshot", "100000", "--output", tmp_path / "e.json"), "--num-fewshot 100000",
                   "use at most")
    assert not (tmp_path / "e.json").exists()


def test_a_model_whose_weights_hold_nan_is_reported_and_plotted(cli: Cli, tmp_path: Path) -> None:
    good = save_tiny_checkpoint(tmp_path / "good", "llama", 4)
    broken = save_tiny_checkpoint(tmp_path / "broken", "llama", 4)
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if "layers.0.mlp.down_proj" in key)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = cli("eval", "--model", good, "--compare", broken, "--ppl", corpus, "--seq-len", "32", "--output",
                 tmp_path / "e.json")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    values = [entry["ppl"] for result in report["models"].values() for entry in result["perplexity"].values()]
    assert math.isfinite(values[0]) and math.isnan(values[1])
    assert (tmp_path / "e.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("args", "fragments"), [
    (["prune", "--layers", "0-99999999999", "--out", "OUT"], ["'0-99999999999'", "more than any model has"]),
    (["score", "--metrics", "random", "--seed", str(2**70)], ["--seed must be at most"]),
    (["score", "--samples", str(10**12), "--data", "CORPUS"], ["--samples", "use at most"]),
])
def test_sizes_past_what_memory_and_torch_allow_are_refused_before_allocating(args: list[str], fragments: list[str],
                                                                             cli: Cli, tmp_path: Path) -> None:
    """These ended in MemoryError, OverflowError and an 8 TB allocation: refused from their declarations."""
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    corpus = write_corpus(tmp_path / "corpus.txt")
    given = [str(corpus) if arg == "CORPUS" else str(tmp_path / "out") if arg == "OUT" else arg for arg in args]
    assert_refused(cli(given[0], "--model", model, *given[1:]), *fragments)
    assert not (tmp_path / "out").exists()


def test_heal_block_past_any_model_is_refused(cli: Cli, tmp_path: Path) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    assert_refused(cli("heal", "--model", model, "--method", "replace-layer", "--block", "0-99999999999", "--data",
                       write_corpus(tmp_path / "corpus.txt"), "--out", tmp_path / "out"), "--block",
                   "more than any model has")


def test_resume_into_a_folder_that_holds_no_run_leaves_it_alone(cli: Cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pruned model's folder is no run to continue: it was deleted to start one."""
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    pruned = tmp_path / "pruned"
    assert cli("prune", "--model", model, "--layers", "1", "--out", pruned).code == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\nscore: {{metrics: [magnitude-l1]}}\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(pruned)
    assert_refused(cli("run", recipe, "--out", pruned, "--resume"), "holds no run")
    assert snapshot(pruned) == before


def test_perplexity_of_a_text_shorter_than_one_window_is_refused(cli: Cli, tmp_path: Path) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    short = tmp_path / "short.txt"
    short.write_text("Short text.")
    assert_refused(cli("eval", "--model", model, "--ppl", short, "--seq-len", "64", "--output", tmp_path / "e.json"),
                   "--seq-len 64 is longer than the whole text", "use at most")
    assert not (tmp_path / "e.json").exists()


def test_a_repair_block_that_is_not_a_removed_run_is_refused(cli: Cli, tmp_path: Path) -> None:
    """On a pruned model --block names the removed run to repair; it once cut two more layers and exited 0."""
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    pruned = tmp_path / "pruned"
    assert cli("prune", "--model", model, "--layers", "1-2", "--out", pruned).code == 0
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert_refused(cli("heal", "--model", pruned, "--method", "replace-linear", "--block", "3-4", "--data", corpus,
                       "--out", tmp_path / "healed"), "--block 3-4 is not a removed run", "removed: 1-2")
    assert not (tmp_path / "healed").exists()
    result = cli("heal", "--model", pruned, "--method", "rescale", "--block", "1-2", "--data", corpus, "--out",
                 tmp_path / "healed")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "healed" / "layerprune.json").read_text())["removed_layers"] == [1, 2]
