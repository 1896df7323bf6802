"""HealConfig, the one declaration of a healing run: the flags, a recipe's heal section and heal()'s
keywords refuse a bad value alike, heal() takes a built config as well as its keywords, and
layerprune.json records the config it ran with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.cli.main import main
from layerprune.errors import OptionError, UsageError
from layerprune.healing import HealConfig, heal
from layerprune.healing.lora import LoRAOptions
from layerprune.healing.partial import PartialFineTuningOptions
from layerprune.recipes import load_recipe, runner
from tests.healing.conftest import pruned_pair
from tests.helpers import save_tiny_checkpoint, write_corpus

# (heal()'s keywords, the same as flags, the same as heal section keys, the error's name in Python, its
# flag, the problem every front-end names)
BAD_VALUES = [
    ({"method": "lora", "lora_rank": 0}, ["--method", "lora", "--lora-rank", "0"], "  method: lora\n  lora_rank: 0\n",
     "lora_rank", "--lora-rank", "must be at least 1, got 0"),
    ({"method": "partial-ft", "steps": 0}, ["--method", "partial-ft", "--steps", "0"],
     "  method: partial-ft\n  steps: 0\n", "steps", "--steps", "must be at least 1, got 0"),
    ({"method": "lora", "precision": "bf16"}, ["--method", "lora", "--precision", "bf16"],
     "  method: lora\n  precision: bf16\n", "precision", "--precision", "'bf16' is not a choice of lora; use one of: "
     "auto, float32, bfloat16"),
]


@pytest.mark.parametrize(("keywords", "flags", "section", "name", "flag", "problem"), BAD_VALUES,
                         ids=[case[3] for case in BAD_VALUES])
def test_a_bad_value_is_refused_alike_by_a_flag_a_recipe_and_python(
        keywords: dict, flags: list[str], section: str, name: str, flag: str, problem: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus.txt")
    model = save_tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(OptionError) as python:
        heal(lp.load_model(model), data=str(corpus), **keywords)
    assert str(python.value) == f"{name} {problem}"

    out = tmp_path / "healed"
    argv = ["heal", "--model", str(model), *flags, "--data", str(corpus), "--out", str(out)]
    if flag == "--precision":  # a flag with choices: argparse refuses it, naming them
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and "invalid choice: 'bf16'" in error
        assert all(f"'{choice}'" in error for choice in ("auto", "float32", "bfloat16"))
    else:
        assert main(argv) == 2
        assert f"{flag} {problem}" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "healed.heal-checkpoints").exists()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny\nheal:\n  data: corpus.txt\n{section}")
    with pytest.raises(UsageError) as refused:
        runner.preflight(load_recipe(recipe), tmp_path / "run")
    assert f"line 5: heal.{name} {problem}" in str(refused.value)


def test_another_methods_option_is_refused_naming_the_method_everywhere(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus.txt")
    message = "train_layers is not available for lora"
    with pytest.raises(UsageError, match=message):
        HealConfig(method="lora", data="corpus.txt", train_layers=2)
    with pytest.raises(UsageError, match=message):
        HealConfig(method="lora", data="corpus.txt", options=PartialFineTuningOptions().model_dump())
    with pytest.raises(UsageError, match="lora takes LoRAOptions, got PartialFineTuningOptions"):
        HealConfig(method="lora", data="corpus.txt", options=PartialFineTuningOptions())
    assert main(["heal", "--model", "m", "--method", "lora", "--data", str(corpus), "--train-layers", "2",
                 "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\nheal:\n  method: lora\n  data: corpus.txt\n  train_layers: 2\n")
    with pytest.raises(UsageError, match=f"line 2: .*{message}"):
        runner.preflight(load_recipe(recipe), tmp_path / "run")


def test_a_missing_method_or_data_is_named() -> None:
    with pytest.raises(OptionError, match="^method is needed: name one of .*partial-ft"):
        HealConfig(data="d")
    with pytest.raises(OptionError, match="^data is needed"):
        HealConfig(method="lora")
    with pytest.raises(UsageError, match="unknown healing method 'lorra'; choose one of: "):
        HealConfig(method="lorra", data="d")


def test_the_options_are_sorted_to_their_classes_and_round_trip() -> None:
    config = HealConfig(method="lora", data="d", steps=7, lora_rank=4, distill=True)
    assert config.training.steps == 7 and config.options == LoRAOptions(lora_rank=4, distill=True)
    assert config.distill
    assert HealConfig(**config.model_dump()) == config  # nested mappings rebuild the method's own class
    assert HealConfig(method="lora", data="d", training=config.training, options=config.options) == config
    assert HealConfig(method="qlora", data="d", options=config.options).options == config.options  # shared class
    assert HealConfig(method="partial-ft", data="d").options == PartialFineTuningOptions()  # the declaration's


def test_heal_takes_a_built_config_as_well_as_its_keywords_and_records_it(tmp_path: Path) -> None:
    corpus = str(write_corpus(tmp_path / "corpus.txt"))
    options = {"steps": 2, "batch_size": 4, "seq_len": 32, "train_layers": 1}
    original, pruned = pruned_pair()
    by_keywords = heal(pruned, "partial-ft", corpus, original=original, **options)
    original, pruned = pruned_pair()
    config = HealConfig(method="partial-ft", data=corpus, **options)
    by_config = heal(pruned, config, original=original)
    for (name, left), right in zip(by_keywords.model.state_dict().items(), by_config.model.state_dict().values(),
                                   strict=True):
        assert torch.equal(left, right), name
    entry = by_config.lineage["healing"][-1]
    assert entry["config"] == config.record() == by_keywords.lineage["healing"][-1]["config"]
    assert HealConfig(**entry["config"]) == config
    assert entry["data"]["source"] == corpus and entry["steps"] == 2  # the entry's own facts stay as they were
    saved = json.loads((lp.save(by_config, tmp_path / "healed") / "layerprune.json").read_text())
    assert saved["healing"][-1]["config"]["options"] == {**PartialFineTuningOptions().model_dump(), "train_layers": 1}
    with pytest.raises(UsageError, match="either a HealConfig or the method, data and options"):
        heal(pruned, config, steps=3)
