"""Labelled sets (sizes, balance, held-out test split), hub names offline, and Alpaca instruction files."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter

import pytest

from layerprune.data import load_instructions, load_labelled
from layerprune.data.instructions import PROMPT_WITH_INPUT
from layerprune.data.labelled import _orange_rows
from layerprune.errors import UsageError


@pytest.mark.real
@pytest.mark.parametrize(
    ("name", "sizes", "classes", "smallest_share"),
    [("rotten-tomatoes", (10247, 2543), 2, 0.40), ("reuters-r8", (5485, 2185), 8, 0.004),
     ("20newsgroups", (11293, 7521), 20, 0.03)],
)
def test_labelled_sets_are_held_out_and_balanced(name: str, sizes: tuple[int, int], classes: int,
                                                 smallest_share: float) -> None:
    train, test = load_labelled(name, "train"), load_labelled(name, "test")
    assert (len(train), len(test)) == sizes and len(train.labels) == len(train.texts)
    assert train.label_names == test.label_names and len(train.label_names) == classes
    assert not set(train.texts) & set(test.texts)
    for dataset in (train, test):
        counts = Counter(dataset.labels)
        assert set(counts) == set(range(classes)) and min(counts.values()) / len(dataset) >= smallest_share
    assert load_labelled(name, "test").texts == test.texts  # the fixed split is the same on every call


@pytest.mark.real
def test_rotten_tomatoes_labels_mean_what_they_say() -> None:
    data = load_labelled("rotten-tomatoes", "train")
    assert data.label_names == ["negative", "positive"]
    by_text = dict(zip(data.texts, data.labels))
    assert sum(by_text[t] for t in data.texts if "masterpiece" in t.lower()) > sum(
        1 - by_text[t] for t in data.texts if "masterpiece" in t.lower())


def test_orange_tab_columns_are_found_by_their_header(tmp_path) -> None:
    path = tmp_path / "t.tab"
    path.write_text("Text\tCategory\nstring\td\n\tclass\n\nsome words\tearn\n\tacq\nmore words\tacq\n")
    assert _orange_rows(path) == [("earn", "some words"), ("acq", "more words")]
    path.write_text("a\tb\nd\td\n\t\n")
    with pytest.raises(UsageError, match="not an Orange text table"):
        _orange_rows(path)


def test_unknown_names_and_splits_are_explained() -> None:
    with pytest.raises(UsageError, match="unknown labelled dataset 'imdb'.*rotten-tomatoes.*sst2, ag_news"):
        load_labelled("imdb")
    with pytest.raises(UsageError, match="unknown split 'validation'.*train or test"):
        load_labelled("rotten-tomatoes", "validation")


class FakeRows(list):
    features = {"label": types.SimpleNamespace(names=["World", "Sports"])}


def test_hub_labelled_sets_map_names_and_fail_clearly_offline(monkeypatch, hub_reachable) -> None:
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeRows([{"text": "a goal", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_labelled("ag_news", "test")
    assert (data.texts, data.labels, data.label_names) == (["a goal"], [1], ["World", "Sports"])
    assert calls == [(("fancyzhx/ag_news",), {"split": "test"})]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach hf.co")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UsageError, match="cannot load 'sst2'.*offline, use rotten-tomatoes"):
        load_labelled("sst2", "train")


def test_alpaca_json_list_with_and_without_input(tmp_path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Sum", "input": "1, 2", "output": " 3"},
                                {"instruction": "Wave", "input": "  ", "output": "o/"}]))
    first, second = load_instructions(path)
    assert first.prompt == PROMPT_WITH_INPUT.format(instruction="Sum", input="1, 2") and first.response == " 3"
    assert second.prompt.endswith("### Instruction:\nWave\n\n### Response:\n") and "### Input" not in second.prompt


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("a.json", "[", "cannot read instruction file"), ("a.json", "[]", "non-empty list"),
     ("a.json", json.dumps({"instruction": "x"}), "non-empty list"), ("a.jsonl", '"text"\n', "record 1 lacks"),
     ("a.jsonl", json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"output": "y"}),
      "record 2 lacks 'instruction' or 'output'")],
)
def test_bad_instruction_files_are_explained(tmp_path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=message):
        load_instructions(tmp_path / name)
    with pytest.raises(UsageError, match="does not exist"):
        load_instructions(tmp_path / "missing.json")
