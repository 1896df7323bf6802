"""EvalConfig, the one declaration of the evaluation options: the flags, a recipe's eval section and
evaluate()'s keywords refuse a bad value alike, its defaults are evaluate()'s, and eval.json is a
typed record its shipped JSON Schema accepts."""

from __future__ import annotations

import copy
import importlib
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

import layerprune as lp
from layerprune.cli.main import main
from layerprune.errors import OptionError, UsageError
from layerprune.evaluation.classification import ClassificationSettings
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.efficiency import Workload
from layerprune.evaluation.record import FORMAT_VERSION, EvalReport
from layerprune.records import SCHEMA_DIR, schema_file, schema_text
from layerprune.recipes import load_recipe, runner
from layerprune.reporting.eval_tables import write_report
from tests.helpers import tiny_loaded

ROOT = Path(__file__).resolve().parents[2]
# the module, not the function layerprune.evaluation exports under the same name
evaluate_module = importlib.import_module("layerprune.evaluation.evaluate")

# (keywords of evaluate, the same as flags, the same as a recipe's eval section, the option's
# keyword path, its flag, the recipe line of its key, the problem every front-end names)
BAD_VALUES = [
    ({"ppl": ["wiki-sample"], "seq_len": 1}, ["--ppl", "wiki-sample", "--seq-len", "1"],
     "eval:\n  ppl: [wiki-sample]\n  seq_len: 1\n", "seq_len", "--seq-len", 4, "must be at least 2, got 1"),
    ({"tasks": ["lp_sentiment_rt"], "num_fewshot": -1}, ["--tasks", "lp_sentiment_rt", "--num-fewshot", "-1"],
     "eval:\n  tasks: [lp_sentiment_rt]\n  num_fewshot: -1\n", "num_fewshot", "--num-fewshot", 4,
     "must be at least 0, got -1"),
    ({"efficiency": {"prompt_len": 0}}, ["--efficiency", "--prompt-len", "0"],
     "eval:\n  efficiency:\n    prompt_len: 0\n", "efficiency.prompt_len", "--prompt-len", 4,
     "must be at least 1, got 0"),
    ({"classify": "rotten-tomatoes", "classification": {"ks": [1], "epochs": 0}},
     ["--classify", "rotten-tomatoes", "--k", "1", "--epochs", "0"],
     "eval:\n  classify: rotten-tomatoes\n  classification:\n    ks: [1]\n    epochs: 0\n", "classification.epochs",
     "--epochs", 6, "must be at least 1, got 0"),
    ({"classify": "rotten-tomatoes", "classification": {"ks": [1], "head_lr": 0.0}},
     ["--classify", "rotten-tomatoes", "--k", "1", "--head-lr", "0"],
     "eval:\n  classify: rotten-tomatoes\n  classification:\n    ks: [1]\n    head_lr: 0.0\n",
     "classification.head_lr", "--head-lr", 6, "must be positive, got 0.0"),
    ({"classify": "rotten-tomatoes"}, ["--classify", "rotten-tomatoes"], "eval:\n  classify: rotten-tomatoes\n",
     "classification.ks", "--k", 2, "must list the layer counts to keep when classify is given"),
]


@pytest.mark.parametrize(("keywords", "flags", "section", "name", "flag", "line", "problem"), BAD_VALUES,
                         ids=[case[3] for case in BAD_VALUES])
def test_a_bad_value_is_refused_alike_by_a_flag_a_recipe_and_python(
        keywords: dict, flags: list[str], section: str, name: str, flag: str, line: int, problem: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OptionError) as python:
        lp.evaluate("some-org/not-downloaded", **keywords)
    assert str(python.value).startswith(f"{name} {problem}")

    output = tmp_path / "eval.json"
    assert main(["eval", "--model", "some-org/not-downloaded", *flags, "--output", str(output)]) == 2
    assert f"{flag} {problem}" in capsys.readouterr().err
    assert not output.exists()

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("model: some-org/not-downloaded\n" + section)
    with pytest.raises(UsageError) as recipe:
        runner.preflight(load_recipe(recipe_file), tmp_path / "run")
    assert f"line {line}: eval.{name} {problem}" in str(recipe.value)


def test_a_recipe_refuses_a_nested_key_of_the_wrong_type_at_its_line(tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(textwrap.dedent("""\
        model: m
        eval:
          efficiency:
            repeats: many
        """))
    with pytest.raises(UsageError, match=r"line 4: 'repeats' must be int"):
        load_recipe(recipe_file)


def test_evaluate_without_options_uses_the_configs_defaults(fake_data_layer, monkeypatch) -> None:
    calls: list[dict] = []
    real = evaluate_module.dataset_perplexity

    def recorded(model, tokenizer, name, seq_len, **keywords):
        calls.append({"seq_len": seq_len, **keywords})
        return real(model, tokenizer, name, seq_len, **keywords)

    monkeypatch.setattr(evaluate_module, "dataset_perplexity", recorded)
    report = lp.evaluate(tiny_loaded(num_layers=2), ppl=[str(fake_data_layer)])  # only what to measure
    defaults = {name: field.default for name, field in EvalConfig.model_fields.items()}
    assert calls == [{"seq_len": defaults["seq_len"], "batch_size": defaults["batch_size"],
                      "max_windows": defaults["max_windows"]}]
    assert report["settings"] == EvalConfig(ppl=(str(fake_data_layer),)).model_dump(mode="json")
    assert report["settings"]["seq_len"] == 512 and report["settings"]["batch_size"] == 4
    assert report["format_version"] == FORMAT_VERSION
    assert EvalConfig(efficiency=True).workload == Workload()  # efficiency: true is the default workload


def test_evaluate_takes_a_config_or_keywords_not_both(fake_data_layer) -> None:
    config = EvalConfig(ppl=(str(fake_data_layer),), seq_len=16)
    report = lp.evaluate(tiny_loaded(num_layers=2), config=config)
    assert report["settings"]["seq_len"] == 16
    with pytest.raises(UsageError, match="not both"):
        lp.evaluate(tiny_loaded(num_layers=2), config=config, seq_len=32)


def shipped_schema() -> dict:
    return json.loads((SCHEMA_DIR / schema_file(EvalReport)).read_text())


def test_the_shipped_eval_schemas_are_the_records_own() -> None:
    assert (SCHEMA_DIR / schema_file(EvalReport)).read_text() == schema_text(EvalReport)
    assert (ROOT / "docs" / "schemas" / schema_file(EvalReport)).read_text() == schema_text(EvalReport)


def test_eval_json_of_a_tiny_model_validates_against_the_shipped_schema(fake_data_layer, tmp_path: Path) -> None:
    loaded = tiny_loaded(num_layers=3)
    pruned = copy.deepcopy(loaded)
    lp.prune(pruned, [1])
    pruned.source = "pruned"
    report = lp.evaluate(loaded, compare=[pruned], ppl=[str(fake_data_layer)], seq_len=32,
                         tasks=["lp_sentiment_rt"], efficiency={"prompt_len": 8, "new_tokens": 2, "repeats": 1},
                         classify="letters", classification=ClassificationSettings(
                             ks=(1,), heads=("head",), train_size=8, test_size=8, epochs=1))
    output = tmp_path / "eval.json"
    write_report(report, output)
    written = json.loads(output.read_text())
    assert written["format_version"] == FORMAT_VERSION
    assert {"perplexity", "tasks", "retained", "efficiency", "classification"} <= set(written["models"]["pruned"])
    jsonschema.validate(written, shipped_schema())
    with pytest.raises(jsonschema.ValidationError):  # the schema has teeth: a result without its layer count fails
        del written["models"]["pruned"]["num_layers"]
        jsonschema.validate(written, shipped_schema())


def test_write_report_refuses_a_report_that_is_not_an_eval_record(tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    with pytest.raises(ValidationError):
        write_report({"reference": "a", "models": {"a": {"num_layers": 0}}, "settings": {"ppl": ["x"]}}, output)
    assert not output.exists()
