"""ExportConfig, the one declaration of how a checkpoint is written: lp.save's keywords, the output flags
of prune, heal and search, and a recipe's export section share its defaults and refuse a bad value
alike, before anything is written."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest

import layerprune as lp
from layerprune.cli.main import build_parser, main
from layerprune.errors import OptionError, UsageError
from layerprune.models.export import FORMATS, PLACEMENT, ExportConfig
from layerprune.options import given_options
from layerprune.recipes import load_recipe, run_recipe, runner
from tests.helpers import save_tiny_checkpoint, tiny_loaded, write_corpus

WRITING_COMMANDS = {
    "prune": ["--layers", "1"],
    "heal": ["--method", "partial-ft", "--data", "wiki-sample"],
    "search": [],
}

# a recipe whose prune stage saves the model: its export section is read there
PRUNE_RECIPE = """\
model: tiny
calibration: {source: corpus.txt, samples: 8, seq_len: 32}
score: {metrics: [bi], batch_size: 4}
select: {remove: 2}
export:
"""


def _subcommand(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_the_defaults_are_the_declarations_in_python_on_the_command_line_and_in_a_recipe(tmp_path: Path) -> None:
    defaults = {name: info.default for name, info in ExportConfig.model_fields.items()}
    keywords = inspect.signature(lp.save).parameters
    assert {name: keywords[name].default for name in defaults if name != "out"} == \
        {name: value for name, value in defaults.items() if name != "out"}
    for command, flags in WRITING_COMMANDS.items():
        args = _subcommand(command).parse_args(["--model", "m", *flags, "--out", "o"])
        assert given_options(args, ExportConfig) == {"out": "o", "overwrite": False, "format": "transformers",
                                                  "gguf_type": None}, command
    keys = runner._section_fields()["export"]
    assert set(keys) == set(defaults) - set(PLACEMENT) and not any(spec.required for spec in keys.values())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRUNE_RECIPE + "  {}\n")
    assert ExportConfig(**load_recipe(recipe).sections["export"]) == ExportConfig()


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("format", "onnx", f"'onnx' is not a choice of export; use one of: {', '.join(FORMATS)}"),
    ("max_shard_size", "lots", "'lots' is not a size; write a whole number and a unit"),
])
def test_a_bad_value_is_refused_alike_by_python_and_a_recipe(key: str, value: str, problem: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny")
    write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "model"
    with pytest.raises(OptionError) as python:
        lp.save(tiny_loaded(), out, **{key: value})
    assert str(python.value).startswith(f"{key} {problem}")
    assert not out.exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRUNE_RECIPE + f"  {key}: {value}\n")
    with pytest.raises(UsageError) as refused:
        runner.preflight(load_recipe(recipe), tmp_path / "run")
    assert f"line 6: export.{key} {problem}" in str(refused.value)


@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
def test_another_format_on_the_command_line_exits_2_naming_the_choices_with_nothing_written(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    capsys.readouterr()  # the checkpoint's own progress bar
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", str(model), *WRITING_COMMANDS[command], "--out", str(out), "--format", "onnx"])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(error.splitlines()) == 1
    assert "--format: invalid choice: 'onnx'" in error and all(f"'{name}'" in error for name in FORMATS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]


def test_a_recipes_export_section_reaches_the_saved_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny", "llama", 6)
    write_corpus(tmp_path / "corpus.txt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRUNE_RECIPE + "  max_shard_size: 20KB\n")
    out = run_recipe(recipe, tmp_path / "run", log=lambda _: None)
    assert len(list((out / "model").glob("model-*.safetensors"))) > 1  # 20 KB shards: the 2GB default writes one
    assert lp.load_model(out / "model").num_layers == 4


def test_an_export_section_without_a_stage_that_saves_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\neval: {ppl: [wiki-sample]}\nexport: {format: transformers}\n")
    with pytest.raises(UsageError, match="line 3: 'export' says how a model is saved, and no stage saves one"):
        load_recipe(recipe)


def test_a_search_takes_only_what_is_written_and_refuses_a_placement(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="option out is not available for the winner's export"):
        lp.search(tiny_loaded(), export_options={"out": str(tmp_path / "x")}, out=tmp_path / "search")
    with pytest.raises(OptionError, match="^format 'onnx' is not a choice of export"):
        lp.search(tiny_loaded(), export_options={"format": "onnx"}, out=tmp_path / "search")
    assert not (tmp_path / "search").exists()
