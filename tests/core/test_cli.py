"""The `layerprune prune` and `layerprune info` commands end to end in a subprocess, and the conventions
every subcommand follows (read from the parser, or run in process)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.cli import commands
from layerprune.cli.main import build_parser, main
from layerprune.models.tiny import tiny_model
from tests.helpers import save_tiny_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerprune.cli.main", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


def test_info_reports_family_and_layers(tiny_dir: Path) -> None:
    result = run_cli("info", "--model", str(tiny_dir), "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["family"] == "gemma"
    assert details["num_layers"] == 6
    assert details["parameters"] == sum(p.numel() for p in tiny_model("gemma3", 6).parameters())


def test_prune_writes_a_plain_checkpoint_and_generates(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = run_cli("prune", "--model", str(tiny_dir), "--layers", "1,3-4", "--out", str(out),
                     "--generate", "abc", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "removed layers [1, 3, 4]: 6 -> 3 layers" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("abc")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "no staging folder may be left behind"
    ids = torch.tensor([[5, 6, 7]])
    assert reloaded(ids).logits.shape == (1, 3, 260)


def test_prune_without_layers_explains_how(tiny_dir: Path, tmp_path: Path) -> None:
    result = run_cli("prune", "--model", str(tiny_dir), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "--layers" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ---- one convention for every subcommand, read from the parser itself --------------------------------------

PARSER = build_parser()
COMMANDS = {name: parser for action in PARSER._actions if isinstance(action, argparse._SubParsersAction)
            for name, parser in action.choices.items()}


# what the folder of commands holds on disk: one module per subcommand, named after it
COMMAND_MODULES = sorted(path.stem for path in Path(commands.__file__).parent.glob("*.py") if path.stem != "__init__")


def test_every_command_module_is_a_command_listed_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The parser registers exactly the commands the folder holds (so the checks below, which run
    over the parser's commands, miss none), each with a line in ``layerprune --help`` and its own help."""
    assert sorted(COMMANDS) == COMMAND_MODULES
    (subparsers,) = [action for action in PARSER._actions if isinstance(action, argparse._SubParsersAction)]
    listed = " ".join(PARSER.format_help().split())  # help lines wrap; compare them with spaces collapsed
    summaries = {line.dest: line.help for line in subparsers._choices_actions}  # a command without help has none
    assert sorted(summaries) == COMMAND_MODULES
    for command, summary in summaries.items():
        assert summary and f"{command} {summary}" in listed, command
    for command in COMMAND_MODULES:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: layerprune {command} ")


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerprune {version}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_opens_with_one_sentence_saying_what_the_command_does(command: str) -> None:
    text = COMMANDS[command].format_help()
    opening = text.split("\n\n")[1].replace("\n", " ")  # the paragraph after the usage
    assert re.fullmatch(r"[A-Z][^.]*\.", opening), opening
    assert opening == COMMANDS[command].description


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command: str) -> None:
    parser = COMMANDS[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and not (action.default is None or action.default is False
                                          or action.default == argparse.SUPPRESS):
            shown = formatter._expand_help(action)
            assert "default" in shown, (action.option_strings, shown)


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"run"}))  # a recipe names its own model
def test_model_is_required_wherever_a_command_works_on_one(command: str) -> None:
    (model,) = [a for a in COMMANDS[command]._actions if "--model" in a.option_strings]
    assert model.required and model.default is None


def test_out_names_a_folder_and_output_a_file() -> None:
    metavars = {(a.option_strings[0], a.metavar) for parser in COMMANDS.values() for a in parser._actions
                if a.option_strings and a.option_strings[0] in ("--out", "--output")}
    assert metavars == {("--out", "FOLDER"), ("--output", "FILE")}


@pytest.mark.parametrize(("args", "unknown"), [
    (["prune", "--model", "m", "--layer", "13", "--out", "o"], "--layer 13"),  # not --layers
    (["score", "--model", "m", "--metric", "bi"], "--metric bi"),  # not --metrics
    (["info", "--model", "m", "--jso"], "--jso"),
    (["heal", "--model", "m", "--method", "lora", "--data", "d", "--out", "o", "--step", "3"], "--step 3"),
])
def test_flags_are_never_completed_from_a_prefix_and_unknown_ones_name_the_command(
        args: list[str], unknown: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"layerprune {args[0]}: error: unrecognized arguments: {unknown} (see --help)\n"


@pytest.mark.parametrize(("flags", "message"), [
    (["--dtype", "int8"], "argument --dtype: unknown dtype 'int8'"),
    (["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (["--device", "cuda:first"], "argument --device: unknown device 'cuda:first'"),
])
def test_dtype_and_device_are_checked_as_the_flags_are_read(flags: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        PARSER.parse_args(["info", "--model", "m", *flags])
    assert capsys.readouterr().err.startswith(f"layerprune info: error: {message}")


@pytest.mark.parametrize(("flags", "dtype", "device"), [
    ([], "auto", "cpu"), (["--dtype", "fp16", "--device", "cuda:1"], "float16", "cuda:1"),
    (["--dtype", "bf16", "--device", "mps"], "bfloat16", "mps"), (["--dtype", "float32", "--device", "auto"], "float32", "auto"),
])
def test_good_dtypes_and_devices_are_read_by_their_long_names(flags: list[str], dtype: str, device: str) -> None:
    args = PARSER.parse_args(["info", "--model", "m", *flags])
    assert (args.dtype, args.device) == (dtype, device)


@pytest.mark.parametrize(("remove", "warned"), [
    ("4", "--remove 4 removes 4 of 6 layers (67%); for a share, write it with %, e.g. --remove 4%"),
    ("67%", "--remove 67% removes 4 of 6 layers (67%)"),
    ("3", None),  # half the layers: a big cut, but not most of the model
])
def test_removing_most_layers_is_said_with_the_share(remove: str, warned: str | None, tiny_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["prune", "--out", str(tmp_path / remove)], ["score"]):
        assert main([command[0], "--model", str(tiny_dir), "--metrics" if command[0] == "score" else "--metric",
                     "magnitude-l1", "--remove", remove, *command[1:]]) == 0
        err = capsys.readouterr().err
        if warned is None:
            assert "warning" not in err, err
        else:
            assert f"layerprune {command[0]}: warning: {warned}\n" in err, err
