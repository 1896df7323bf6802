"""Typed options: one declaration per unit gives the flag, the recipe key and the API default.

The consistency tests walk every option of every registered unit, so a unit added later is
checked without a new test; each compares the three places against the declaration read
directly from the pydantic fields (``model_fields``, not through :mod:`layerprune.options`).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Annotated

import pytest
from pydantic_core import PydanticUndefined

from layerprune.cli.main import build_parser, main
from layerprune.data.calibration import SAMPLINGS, CalibrationConfig, build_calibration
from layerprune.errors import OptionError, UsageError
from layerprune.healing import HEALERS
from layerprune.healing.base import TrainingOptions
from layerprune.healing.heal import heal_config
from layerprune.repair import REPAIRS
from layerprune.options import (Config, Parse, add_option_flags, build_options, comma_choices, given_options, option,
                                options_table)
from layerprune.recipes.runner import _heal_config, _repair_options, _section_fields, load_recipe, preflight
from layerprune.repair import RepairConfig, ReplaceLinearOptions, compensate
from layerprune.scoring import METRICS, ScoreConfig, score
from layerprune.scoring.base import metric_options
from layerprune.scoring.streaming import STREAMING_BATCH_SIZE, stream_score
from layerprune.searching import search
from layerprune.selection import STRATEGIES, SelectConfig, select
from tests.helpers import tiny_loaded
from tests.scoring.references import rows_with_padding

UNIT_REGISTRIES = {"metric": METRICS, "healing method": HEALERS, "repair": REPAIRS, "strategy": STRATEGIES,
                   "sampling": SAMPLINGS}


def declared(options_class: type | None) -> dict[str, object]:
    """Option name -> default, straight from the pydantic fields."""
    if options_class is None:
        return {}
    return {name: info.default for name, info in options_class.model_fields.items()}


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def flag_action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_unit_option_has_a_type_a_default_and_help() -> None:
    for kind, registry in UNIT_REGISTRIES.items():
        for name in registry.names():
            options_class = getattr(registry.get(name), "options_class", None)
            for field_name, info in options_class.model_fields.items() if options_class else ():
                assert info.default is not PydanticUndefined, f"{kind} {name}: {field_name} has no default"
                assert info.description, f"{kind} {name}: {field_name} has no help"


@pytest.mark.parametrize("method", HEALERS.names())
def test_heal_flag_default_equals_api_default_equals_recipe_default(method: str, tmp_path: Path) -> None:
    defaults = {**declared(TrainingOptions), **declared(HEALERS.get(method).options_class)}
    # API: heal() with no options
    api = heal_config(method, "wiki-sample")
    api_values = {**api.training.model_dump(), **(api.options.model_dump() if api.options is not None else {})}
    assert api_values == defaults
    # CLI: each flag shows the declared default, and a run without the flag passes nothing
    parser = subcommand("heal")
    args = parser.parse_args(["--model", "m", "--method", method, "--data", "d", "--out", "o"])
    assert given_options(args, TrainingOptions) == {}
    for name, default in defaults.items():
        action = flag_action(parser, "--" + name.replace("_", "-"))
        assert action.dest == name
        if default is not None:
            shown = ("on" if default else "off") if isinstance(default, bool) else str(default)
            assert f"(default: {shown})" in action.help, (name, action.help)
    cli = heal_config(method, "d", checkpoint_dir=tmp_path, **given_options(args, TrainingOptions))
    assert cli.training == api.training
    # recipe: every option is an optional key, and a recipe that leaves it out gets the declaration
    keys = _section_fields()["heal"]
    assert all(name in keys and not keys[name].required for name in defaults)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: m\nheal: {{method: {method}, data: d}}\n")
    recipe = _heal_config(load_recipe(recipe_file), tmp_path)
    assert recipe.training == api.training
    assert recipe.options == api.options


def test_checkpoint_default_is_a_quarter_of_the_steps_on_the_cli_in_recipes_and_the_api(tmp_path: Path) -> None:
    assert heal_config("partial-ft", "d", steps=40, checkpoint_dir=tmp_path).checkpoint_interval == 10
    assert heal_config("partial-ft", "d", steps=40).checkpoint_interval == 0  # nowhere to write
    never = heal_config("partial-ft", "d", steps=40, checkpoint_every=0, checkpoint_dir=tmp_path)
    assert never.checkpoint_interval == 0
    assert heal_config("partial-ft", "d", steps=2, checkpoint_dir=tmp_path).checkpoint_interval == 1


@pytest.mark.parametrize("metric", METRICS.names())
def test_metric_flag_default_equals_api_default_equals_recipe_default(metric: str) -> None:
    defaults = declared(METRICS.get(metric).options_class)
    resolved = metric_options([metric], {})
    parser = subcommand("score")
    args = parser.parse_args(["--model", "m"])  # --model is required on every command
    keys = _section_fields()["score"]
    for name, default in defaults.items():
        assert resolved[name] == default
        assert getattr(args, name) == default, f"--{name} of score"
        assert name in keys and not keys[name].required


@pytest.mark.parametrize("repair", REPAIRS.names())
def test_repair_flag_default_equals_api_default_equals_recipe_default(repair: str, tmp_path: Path) -> None:
    """prune --compensate's flags, a recipe's repair section and compensate()'s defaults are the declaration."""
    method = REPAIRS.get(repair)
    defaults = declared(method.options_class)
    parser = subcommand("prune")
    for name, default in defaults.items():
        action = flag_action(parser, "--" + name.replace("_", "-"))
        assert action.dest == name and f"(default: {default})" in action.help, (name, action.help)
    keys = _section_fields()["repair"]
    assert all(name in keys and not keys[name].required for name in defaults)
    from_recipe = _repair_options({"method": repair})
    assert from_recipe["options"] is None  # compensate() then builds the declaration's defaults
    if method.options_class is not None:
        assert method.options_class().model_dump() == defaults
        first, default = next(iter(defaults.items()))
        with pytest.raises(OptionError) as raised:  # a recipe's value is checked like the flag's
            _repair_options({"method": repair, first: "x" if not isinstance(default, str) else 1})
        assert raised.value.name == first


def test_score_flag_default_equals_api_default_equals_recipe_default(tmp_path: Path) -> None:
    """ScoreConfig is score()'s keywords, score's and prune's flags and the recipe's score keys; the
    report (scores.json) records it. --batch-size is read only where given: --streaming's is 1."""
    defaults = declared(ScoreConfig)
    api = inspect.signature(score).parameters
    assert {name: api[name].default for name in defaults} == defaults
    args = subcommand("score").parse_args(["--model", "m"])
    assert ScoreConfig(**given_options(args, ScoreConfig)).model_dump() == defaults
    action = flag_action(subcommand("score"), "--batch-size")
    assert "(default: 8)" in action.help and flag_action(subcommand("prune"), "--batch-size").help == action.help
    assert "streaming" not in action.help  # prune has no --streaming: the flag that changes it says so itself
    assert "--batch-size is then 1 unless given" in flag_action(subcommand("score"), "--streaming").help
    assert "bi" in flag_action(subcommand("score"), "--metrics").help  # the choices, listed as argparse cannot
    assert inspect.signature(stream_score).parameters["batch_size"].default == STREAMING_BATCH_SIZE
    keys = _section_fields()["score"]
    assert all(name in keys and not keys[name].required for name in defaults)
    report = score(tiny_loaded("llama"), rows_with_padding())
    assert report.config == ScoreConfig() and report.to_json()["config"] == {"metrics": ["bi"], "batch_size": 8,
                                                                    "granularity": "layer"}


def test_select_flag_default_equals_api_default_equals_recipe_default(tmp_path: Path) -> None:
    """SelectConfig is select()'s keywords, the selection flags (score's --select-by) and the recipe's
    select keys; --iterative is --strategy iterative."""
    defaults = declared(SelectConfig)
    named = ("layers", "attention", "mlp")
    assert defaults == {"remove": None, "strategy": "independent", "metric": None, **dict.fromkeys(named)}
    api = inspect.signature(select).parameters
    assert {name: api[name].default for name in ("strategy", "metric", *named)} == {
        "strategy": "independent", "metric": None, **dict.fromkeys(named)}
    args = subcommand("score").parse_args(["--model", "m"])
    # explicit layers and branches are prune's --layers/--attention/--mlp and a recipe's select keys, no
    # flags of score's
    assert given_options(args, SelectConfig) == {k: v for k, v in defaults.items() if k not in named}
    assert flag_action(subcommand("score"), "--select-by").dest == "metric"
    keys = _section_fields()["select"]
    assert set(keys) == set(defaults) and not any(spec.required for spec in keys.values())
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: m\nscore: {metrics: [bi]}\nselect: {remove: 2}\n")
    assert SelectConfig(**load_recipe(recipe_file).sections["select"]) == SelectConfig(remove=2)
    assert SelectConfig(remove="25%").count(30) == 8
    with pytest.raises(OptionError, match="^remove is not given"):
        SelectConfig().count(30)


def test_repair_config_holds_its_methods_options_and_refuses_anothers() -> None:
    """RepairConfig's options are its method's options class, given or built from a mapping; flat keys
    (a recipe section, the flags) go to the method, and a key another method declares is refused
    naming that method."""
    assert RepairConfig(method="replace-linear", options={"ridge": 0.5}).options == ReplaceLinearOptions(ridge=0.5)
    assert RepairConfig.from_flat({"method": "replace-linear", "ridge": 0.5}).options == ReplaceLinearOptions(ridge=0.5)
    assert RepairConfig(method="rescale").record() == {"method": "rescale", "batch_size": 8, "options": {}}
    with pytest.raises(OptionError, match="^ridge is an option of replace-linear, not of rescale"):
        RepairConfig.from_flat({"method": "rescale", "ridge": 0.5})
    with pytest.raises(OptionError, match="^options of merge are a MergeOptions, got ReplaceLinearOptions"):
        RepairConfig(method="merge", options=ReplaceLinearOptions())
    with pytest.raises(OptionError, match="^options.ridge must be at least 0"):
        RepairConfig(method="replace-linear", options={"ridge": -1.5})
    with pytest.raises(OptionError, match="^method is not given; choose one of: merge, replace-linear, rescale"):
        RepairConfig.from_flat({"ridge": 0.5})
    with pytest.raises(OptionError, match="^method names an unknown repair method 'mend'"):
        RepairConfig(method="mend")


REFUSALS = {
    # name: (the command line, the recipe's sections, the same value in Python, the refusal after its name,
    #        the name as the flag / the recipe key / the keyword)
    "score batch": (["score", "--model", "m", "--batch-size", "0"], "score: {batch_size: 0}",
                    lambda: score(tiny_loaded("llama"), rows_with_padding(), batch_size=0), "must be at least 1, got 0",
                    ("--batch-size", "score.batch_size", "batch_size")),
    "score metrics": (["score", "--model", "m", "--metrics", "bi,nope"], "score: {metrics: [bi, nope]}",
                      lambda: score(tiny_loaded("llama"), rows_with_padding(), ["bi", "nope"]),
                      "names an unknown metric 'nope'; choose one of: angular, bi", ("--metrics", "score.metrics", "metrics")),
    "select remove": (["score", "--model", "m", "--remove", "many"], "score: {metrics: [bi]}\nselect: {remove: many}",
                      lambda: select(score(tiny_loaded("llama"), None, ["random"]), "many"),
                      "'many' cannot be read; give a layer count (8) or a share (25%)",
                      ("--remove", "select.remove", "remove")),
    "select strategy": (["score", "--model", "m", "--remove", "1", "--strategy", "greedy"],
                        "score: {metrics: [bi]}\nselect: {remove: 1, strategy: greedy}",
                        lambda: select(score(tiny_loaded("llama"), None, ["random"]), 1, "greedy"),
                        "names an unknown strategy 'greedy'; choose one of: consecutive, independent, iterative",
                        ("--strategy", "select.strategy", "strategy")),
    "repair batch": (["prune", "--model", "m", "--layers", "1", "--compensate", "rescale", "--batch-size", "0"],
                     "score: {metrics: [bi]}\nselect: {remove: 1}\nrepair: {method: rescale, batch_size: 0}",
                     lambda: compensate(tiny_loaded("llama"), [1], "rescale", rows_with_padding(), batch_size=0),
                     "must be at least 1, got 0", ("--batch-size", "repair.batch_size", "batch_size")),
    "repair option": (["prune", "--model", "m", "--layers", "1", "--compensate", "replace-linear", "--ridge=-1.5"],
                      "score: {metrics: [bi]}\nselect: {remove: 1}\nrepair: {method: replace-linear, ridge: -1.5}",
                      lambda: compensate(tiny_loaded("llama"), [1], "replace-linear", rows_with_padding(),
                                         options=ReplaceLinearOptions(ridge=-1.5)),
                      "must be at least 0.0, got -1.5", ("--ridge", "repair.ridge", "ridge")),
    "another method's option": (["prune", "--model", "m", "--layers", "1", "--compensate", "rescale", "--ridge", "1"],
                                "score: {metrics: [bi]}\nselect: {remove: 1}\nrepair: {method: rescale, ridge: 1.0}",
                                lambda: RepairConfig.from_flat({"method": "rescale", "ridge": 1.0}),
                                "is an option of replace-linear, not of rescale", ("--ridge", "repair.ridge", "ridge")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_stage_option_is_refused_alike_by_flag_recipe_key_and_keyword(case: str, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The same bad value of a ScoreConfig, SelectConfig or RepairConfig option is the same refusal from
    the command line (its flag; argparse's own words for a choice it lists), a recipe (its section key
    and line, before anything runs) and Python (its keyword)."""
    argv, sections, call, problem, (flag, key, keyword) = REFUSALS[case]
    try:
        code = main([*argv, *(["--out", str(tmp_path / "out")] if argv[0] == "prune" else [])])
    except SystemExit as exit:  # argparse refuses a choice it lists itself
        code = exit.code
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1
    if flag == "--strategy":  # argparse knows the choices of a plain flag
        assert "--strategy: invalid choice: 'greedy'" in error
    else:
        assert f"{flag} {problem}" in error, error
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: some-org/not-downloaded\n{sections}\n")
    line = 1 + sections.count("\n") + 1
    with pytest.raises(UsageError) as raised:
        preflight(load_recipe(recipe_file), tmp_path / "out")
    assert f"line {line}: {key} {problem}" in str(raised.value)
    with pytest.raises(OptionError) as raised:
        call()
    assert str(raised.value).startswith(f"{keyword} {problem}")
    assert not (tmp_path / "out").exists()


def test_calibration_flag_default_equals_api_default_equals_recipe_default(tmp_path: Path) -> None:
    defaults = declared(CalibrationConfig)
    assert defaults["samples"] == 64 and defaults["seq_len"] == 256  # one default: the command line's
    for command in ("score", "prune", "search"):
        args = subcommand(command).parse_args(["--model", "m", *(["--out", "o"] if command != "score" else [])])
        assert given_options(args, CalibrationConfig) == defaults, command
    api = inspect.signature(build_calibration).parameters
    assert {name: api[name].default for name in defaults} == defaults
    assert inspect.signature(search).parameters["calibration"].default.model_dump() == defaults
    keys = _section_fields()["calibration"]
    assert set(keys) == set(defaults) and not any(spec.required for spec in keys.values())
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: m\nscore: {metrics: [bi]}\n")
    assert CalibrationConfig(**load_recipe(recipe_file).sections["calibration"]).model_dump() == defaults


def test_unknown_options_are_refused_naming_the_unit_and_its_options() -> None:
    with pytest.raises(UsageError, match=r"lora_rnk is not available for lora; .*lora_rank"):
        heal_config("lora", "d", lora_rnk=4)
    with pytest.raises(UsageError, match=r"train_layers is not available for lora"):
        heal_config("lora", "d", train_layers=2)
    with pytest.raises(UsageError, match=r"position is not available for scoring; .*positions"):
        score(tiny_loaded("llama"), rows_with_padding(), ["bi"], position="last")


def test_heal_cli_refuses_another_methods_flag(tmp_path: Path, capsys) -> None:
    code = main(["heal", "--model", str(tmp_path / "nowhere"), "--method", "partial-ft", "--data", "wiki-sample",
                 "--lora-rank", "4", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "lora_rank is not available for partial-ft" in capsys.readouterr().err


def test_precision_speaks_the_dtype_vocabulary() -> None:
    assert heal_config("lora", "d", precision="bfloat16").training.precision == "bfloat16"
    with pytest.raises(UsageError, match="auto, float32, bfloat16"):
        heal_config("lora", "d", precision="bf16")
    with pytest.raises(SystemExit):
        subcommand("heal").parse_args(["--model", "m", "--method", "lora", "--data", "d", "--out", "o",
                                       "--precision", "fp32"])


class ToyOptions(Config):
    unit = "toy"

    size: int = option(3, "how many", minimum=1)
    share: float = option(0.5, "a share", minimum=0.0, maximum=1.0)
    mode: str = option("a", "which mode", choices=("a", "b"))
    loud: bool = option(False, "say more")
    span: Annotated[tuple[int, int] | None, Parse(lambda text: tuple(int(x) for x in text.split("-")))] = option(
        None, "two numbers", flag="--range")

    def check(self) -> None:
        if self.mode == "b" and self.size > 5:
            raise UsageError("mode b takes at most 5")


def test_machinery_builds_flags_checks_values_and_renders_a_table() -> None:
    parser = argparse.ArgumentParser()
    add_option_flags(parser, ToyOptions)
    args = parser.parse_args(["--size", "4", "--loud", "--range", "2-7"])
    assert given_options(args, ToyOptions) == {"size": 4, "share": 0.5, "mode": "a", "loud": True, "span": (2, 7)}
    assert "(default: 3)" in flag_action(parser, "--size").help
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    only_given = argparse.ArgumentParser()
    add_option_flags(only_given, ToyOptions, only_given=True)
    assert given_options(only_given.parse_args(["--mode", "b"]), ToyOptions) == {"mode": "b"}
    assert build_options(ToyOptions, {"size": 2}, unit="toy") == ToyOptions(size=2)
    # raised to Python, an option is named by its keyword; the command line renders the same error with its flag
    for values, message in [({"size": 0}, "^size must be at least 1"), ({"share": 1.5}, "^share must be at most 1"),
                            ({"size": "3"}, "^size of toy must be int"), ({"mode": "c"}, "not a choice of toy"),
                            ({"mode": "b", "size": 6}, "mode b takes at most 5"),
                            ({"sise": 2}, "sise is not available for toy; the options of toy are: size, share")]:
        with pytest.raises(UsageError, match=message):
            build_options(ToyOptions, values, unit="toy")
    with pytest.raises(OptionError) as raised:
        build_options(ToyOptions, {"span": (1, 2), "size": 0}, unit="toy")
    assert raised.value.render(raised.value.flag) == "--size must be at least 1, got 0"
    with pytest.raises(OptionError) as raised:
        build_options(ToyOptions, {"span": "1-2"}, unit="toy")
    assert raised.value.flag == "--range" and str(raised.value).startswith("span of toy must be")
    table = options_table(ToyOptions)
    assert table[2] == "| `size` | `--size` | int | `3` | how many; >= 1 |"
    assert "`--range`" in table[-1] and "list of int or null" in table[-1]
    assert options_table(None) == []


def test_comma_choices_keeps_known_names_and_refuses_unknown_or_empty_ones() -> None:
    """The argparse type both benchmarks' name lists use: the names in order, or a refusal that lists
    the choices (argparse turns it into exit 2 naming the flag)."""
    parse = comma_choices(["lora", "lora+distill"])
    assert parse("lora+distill, lora") == ["lora+distill", "lora"]
    for text, problem in (("lora,qlora", "unknown qlora"), ("lora,", "empty entry")):
        with pytest.raises(argparse.ArgumentTypeError, match=problem) as refused:
            parse(text)
        assert "choose from lora, lora+distill" in str(refused.value)
