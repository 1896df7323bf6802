"""Malformed configs and indexes, over every family: refused in one line, before anything is built.

A layer count of the wrong type or past what the weights could hold once ended in a TypeError
traceback, or in an allocation that hung (``info``) or was killed for memory (``prune``); a sharded
checkpoint's malformed ``weight_map`` in a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoConfig

from tests.conftest import FAMILIES
from tests.helpers import save_tiny_checkpoint
from tests.reliability.conftest import CliResult, assert_refused, snapshot

Cli = Callable[..., CliResult]

BAD_LAYER_COUNTS = {"a string": "4", "a float": 4.0, "a bool": True, "null": None, "zero": 0, "negative": -3,
                    "past the weights": 10**12}


def layer_key(folder: Path) -> str:
    """The config.json key that holds the layer count in this family (``n_layer`` for GPT-2, ...)."""
    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config()
    key = {alias: name for name, alias in text.attribute_map.items()}.get("num_hidden_layers", "num_hidden_layers")
    document = json.loads((folder / "config.json").read_text())
    return key if key in document else "num_hidden_layers"


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "model", request.param, 4)


@pytest.mark.parametrize("value", BAD_LAYER_COUNTS.values(), ids=BAD_LAYER_COUNTS.keys())
def test_a_malformed_layer_count_is_refused_before_anything_is_built(family_dir: Path, value: object, cli: Cli,
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for item in family_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    document = json.loads((folder / "config.json").read_text())
    key = layer_key(family_dir)
    nested = "text_config" in document and key not in document
    (document["text_config"] if nested else document)[key] = value
    (folder / "config.json").write_text(json.dumps(document))
    before = snapshot(folder)
    assert_refused(cli("info", "--model", folder), "config")
    assert_refused(cli("prune", "--model", folder, "--layers", "1", "--out", tmp_path / "out"), "config")
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight_map", [["a", "b"], {"model.embed_tokens.weight": 3}, {"x": "../elsewhere.safetensors"},
                                        "all in one"])
def test_a_malformed_index_is_refused_in_one_line(weight_map: object, cli: Cli, tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / "sharded", "llama", 4, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    for command in (["info"], ["prune", "--layers", "1", "--out", tmp_path / "out"],
                    ["score", "--streaming", "--metrics", "magnitude-l1"]):
        assert_refused(cli(command[0], "--model", folder, *command[1:]), "weight_map")
    assert not (tmp_path / "out").exists()
