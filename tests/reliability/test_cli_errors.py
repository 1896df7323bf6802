"""Bad input, clear error: every row of the table in docs/errors.md, through the real CLI.

Each refusal must exit with code 2, print exactly one line on stderr that names the problem, show
no traceback, and write nothing: neither the output folder nor anything inside the input model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, BertConfig

from tests.reliability.conftest import CliResult, assert_refused, running_as_root, snapshot

Cli = Callable[..., CliResult]

UNREADABLE = {
    "corrupt config.json": "config.json",
    "random bytes as safetensors": "weight files intact",
    "truncated safetensors": "weight files intact",
    "config but no weights": "no weight files",
    "folder without config.json": "not a model folder",
    "random bytes named .gguf": "cannot read GGUF file",
    "GGUF truncated to 30 bytes": "cannot read GGUF file",
    "GGUF truncated to 200 bytes": "cannot read GGUF file",
    "GGUF truncated to 668 bytes": "cannot read GGUF file",
    "GGUF with invalid metadata": "cannot read GGUF file",
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_model_is_refused(case: str, broken: dict[str, Path], cli: Cli, tmp_path: Path) -> None:
    assert set(UNREADABLE) == set(broken), "every broken input has its expected message"
    model = broken[case]
    before = snapshot(model.parent)
    assert_refused(cli("info", "--model", model), UNREADABLE[case])
    assert_refused(cli("prune", "--model", model, "--layers", "1", "--out", tmp_path / "out"), UNREADABLE[case])
    assert snapshot(model.parent) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["does/not/exist/", "missing.gguf", "./nowhere"])
def test_missing_model_is_refused(model: str, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("info", "--model", model), "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(running_as_root(), reason="root reads files whatever their permissions")
def test_unreadable_weights_are_refused(tiny_dir: Path, cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "model.safetensors").chmod(0)
    try:
        assert_refused(cli("info", "--model", model), "model.safetensors")
    finally:
        (model / "model.safetensors").chmod(0o644)


def test_encoder_only_model_is_refused_before_its_weights(cli: Cli, tmp_path: Path, no_weight_loading: None) -> None:
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"never read")
    before = snapshot(tmp_path)
    assert_refused(cli("prune", "--model", tmp_path / "bert", "--layers", "0", "--out", tmp_path / "out"),
                   "'bert' is not a causal", "supports: ")
    assert snapshot(tmp_path) == before


LAYER_ROWS = {
    "no --layers": ([], "say which layers"),
    "empty list": (["--layers", " , "], "no layers to remove"),
    "remove all": (["--layers", "0-3"], "cannot remove all 4 layers"),
    "more than L": (["--layers", "0-5"], "out of range: the model has 4 layers"),
    "negative": (["--layers=-1"], "must be >= 0"),
    "negative in a list": (["--layers", "2,-3"], "must be >= 0"),
    "duplicate": (["--layers", "1,1"], "more than once"),
    "duplicate via range": (["--layers", "0-2,2"], "more than once"),
    "out of range": (["--layers", "4"], "out of range"),
    "not a number": (["--layers", "two"], "cannot read layer index 'two'"),
    "backwards range": (["--layers", "3-1"], "runs backwards"),
    "half a range": (["--layers", "2-"], "cannot read layer index '2-'"),
    "empty entry": (["--layers", "1,,2"], "cannot read an empty entry in '1,,2'"),
    "trailing comma": (["--layers", "1,2,"], "cannot read an empty entry in '1,2,'"),
    "only commas": (["--layers", ",,"], "no layers to remove"),
    "plus sign": (["--layers", "+3"], "cannot read layer index '+3'"),
    "non-ASCII digits": (["--layers", "\uff13"], "cannot read layer index '\uff13'"),
    "Arabic-Indic digits in a range": (["--layers", "1-\u0663"], "cannot read layer index '1-\u0663'"),
}


@pytest.mark.parametrize("row", sorted(LAYER_ROWS))
def test_bad_layer_indices_are_refused_before_loading(row: str, tiny_dir: Path, cli: Cli, tmp_path: Path,
                                                      no_weight_loading: None) -> None:
    flags, message = LAYER_ROWS[row]
    before = snapshot(tiny_dir)
    assert_refused(cli("prune", "--model", tiny_dir, *flags, "--out", tmp_path / "out"), message)
    assert snapshot(tiny_dir) == before
    assert list(tmp_path.iterdir()) == []


def test_output_that_exists_is_refused_without_overwrite(tiny_dir: Path, cli: Cli, tmp_path: Path,
                                                         no_weight_loading: None) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    before = snapshot(tmp_path)
    assert_refused(cli("prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "out"),
                   "already exists", "--overwrite")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["the input itself", "inside the input", "deep inside the input"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_in_the_input_folder_is_refused_before_loading(where: str, overwrite: bool, tiny_dir: Path, cli: Cli,
                                                              no_weight_loading: None) -> None:
    out = {"the input itself": tiny_dir, "inside the input": tiny_dir / "pruned",
           "deep inside the input": tiny_dir / "a" / ".." / "b" / "c"}[where]
    before = snapshot(tiny_dir)
    flags = ["--overwrite"] if overwrite else []
    assert_refused(cli("prune", "--model", tiny_dir, "--layers", "1", "--out", out, *flags), "inside the input")
    assert snapshot(tiny_dir) == before


def test_output_inside_a_gguf_files_folder_is_refused(broken: dict[str, Path], cli: Cli,
                                                      no_weight_loading: None) -> None:
    gguf = broken["random bytes named .gguf"]
    assert_refused(cli("prune", "--model", gguf, "--layers", "1", "--out", gguf.parent, "--overwrite"),
                   "inside the input")


def test_output_that_is_a_file_is_refused(tiny_dir: Path, cli: Cli, tmp_path: Path, no_weight_loading: None) -> None:
    (tmp_path / "out").write_text("not a folder")
    assert_refused(cli("prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "out", "--overwrite"),
                   "is not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_not_enough_disk_space_is_refused_before_writing(tiny_dir: Path, cli: Cli, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr("shutil.disk_usage", lambda path: real(path)._replace(free=10 * 2**20))
    assert_refused(cli("prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "out"),
                   "not enough disk space", "MiB free")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("shutil.disk_usage", real)
    assert cli("prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "out").code == 0


OPTION_ROWS = {
    "unknown dtype": (["--dtype", "int3"], "unknown dtype 'int3'"),
    "unknown device": (["--device", "gpu0"], "unknown device 'gpu0'"),
    "CUDA without a GPU": (["--device", "cuda"], "no CUDA GPU"),
    "zero new tokens": (["--generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    "unknown flag": (["--layrs", "1"], "unrecognized arguments"),
    "non-integer option": (["--max-new-tokens", "many"], "invalid int value"),
}


@pytest.mark.parametrize("row", sorted(OPTION_ROWS))
def test_bad_options_are_refused(row: str, tiny_dir: Path, cli: Cli, tmp_path: Path, no_weight_loading: None) -> None:
    flags, message = OPTION_ROWS[row]
    if "--layrs" not in flags:
        flags = ["--layers", "1", *flags]
    if row == "CUDA without a GPU" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused(cli("prune", "--model", tiny_dir, "--out", tmp_path / "out", *flags), message)
    assert list(tmp_path.iterdir()) == []


def test_a_valid_prune_passes_the_same_checks(tiny_dir: Path, cli: Cli, tmp_path: Path) -> None:
    """The runner and the checks above have teeth: good input gets through and writes a model."""
    result = cli("prune", "--model", tiny_dir, "--layers", "1,3", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _cli_subprocess(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerprune.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_in_a_real_process_a_refusal_is_one_line_and_exit_2(broken: dict[str, Path], tmp_path: Path) -> None:
    """The same contract end to end: interpreter, logging and progress bars included."""
    result = _cli_subprocess("prune", "--model", broken["truncated safetensors"], "--layers", "1",
                             "--out", tmp_path / "out")
    assert_refused(CliResult(result.returncode, result.stdout, result.stderr), "weight files intact")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("share", ["0%", "120%", "-5%", "100%"])
def test_a_percent_outside_0_100_is_refused_before_loading(share: str, tiny_dir: Path, cli: Cli, tmp_path: Path,
                                                           no_weight_loading: None) -> None:
    assert_refused(cli("prune", "--model", tiny_dir, "--metric", "bi", "--remove", share, "--out", tmp_path / "out"),
                   "--remove")
    assert list(tmp_path.iterdir()) == []


CALIBRATION_ROWS = {
    "empty file": ("empty.txt", "\n \n", [], "holds no text"),
    "shorter than one window": ("short.txt", "tiny", ["--seq-len", "16"], "fewer than --seq-len 16"),
    "unknown format": ("data.xml", "<a/>", [], "unknown data format .xml"),
    "--seq-len over the context": ("long.txt", "word " * 2000, ["--seq-len", "300"],
                                   "longer than the model's context of 256 tokens"),
}


@pytest.mark.parametrize("row", sorted(CALIBRATION_ROWS))
def test_bad_calibration_data_is_refused(row: str, tiny_dir: Path, cli: Cli, tmp_path: Path) -> None:
    name, text, flags, message = CALIBRATION_ROWS[row]
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_text(text)
    assert_refused(cli("score", "--model", tiny_dir, "--data", data / name, "--output", tmp_path / "scores.json",
                       *flags), message)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


RECIPE_ROWS = {
    "unknown key": ("score:\n  metrics: [bi]\n  positons: last\n", "line 4: unknown key 'positons' in section 'score'"),
    "wrong type": ("score: {metrics: [bi]}\nselect:\n  remove: [1, 2]\n", "line 4: 'remove' must be int or str"),
    "missing field": ("heal:\n  steps: 5\n", "line 2: section 'heal' is missing the required key(s) method, data"),
    "model path escaping": ("model: ../elsewhere\nscore: {metrics: [bi]}\n", "line 1: path '../elsewhere' lies outside"),
    "data path escaping": ("score: {metrics: [bi]}\ncalibration: {source: /etc/hostname}\n",
                           "line 3: path '/etc/hostname' lies outside"),
}


@pytest.mark.parametrize("row", sorted(RECIPE_ROWS))
def test_bad_recipes_are_refused_with_the_line(row: str, tiny_dir: Path, cli: Cli, tmp_path: Path,
                                               no_weight_loading: None) -> None:
    text, message = RECIPE_ROWS[row]
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    model_line = "" if text.startswith("model:") else f"model: {tiny_dir}\n"
    (recipes / "recipe.yaml").write_text(model_line + text)
    assert_refused(cli("run", recipes / "recipe.yaml", "--out", tmp_path / "out", "--allow-path", tiny_dir.parent),
                   message)
    assert [p.name for p in tmp_path.iterdir()] == ["recipes"]
