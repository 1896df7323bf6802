"""Text sources: markup stripping, fixed held-out splits, local formats, hub name mapping offline."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from layerprune.data import SPLITS, load_texts
from layerprune import hub
from layerprune.data.sources import check_source, source_key
from layerprune.data.wikitext import iter_articles, strip_markup
from layerprune.errors import UsageError


@pytest.mark.parametrize(
    ("wiki", "plain"),
    [
        ("A {{outer|x={{inner|{{deep}}}}|y=2}}B", "A B"),
        ("{{Infobox|table={|\n|a\n|}}}Text", "Text"),
        ("[[Target page|shown text]] and [[Plain]]", "shown text and Plain"),
        ("[[File:X.jpg|thumb|A [[linked]] caption]]Prose[[Category:Things|sort key]]", "Prose"),
        ("[[:Category:Things]]Rest", "Rest"),
        ("x<ref name=a>cite {{web}}</ref>y<ref name=b/>z<!-- note -->", "xyz"),
        ("'''Bold''' and ''italic'' and '''''both'''''", "Bold and italic and both"),
        ("Intro\n=== Sub heading ===\nBody", "Intro\nSub heading\nBody"),
        ("[http://a.org the text] and [https://b.org]", "the text and"),
        ("__TOC__\nKept <small>small</small> &amp; <br/>done", "Kept small & done"),
        ("Before\n== See also ==\n* [[Other]]", "Before"),
    ],
)
def test_strip_markup(wiki: str, plain: str) -> None:
    assert strip_markup(wiki) == plain


def test_iter_articles_keeps_main_namespace_prose_only() -> None:
    def page(title: str, ns: int, text: str) -> str:
        return f"<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>"

    dump = ("<mediawiki xmlns='http://www.mediawiki.org/xml/export-0.10/'>"
            + page("Kept", 0, "'''Kept''' prose") + page("Redirect", 0, "#REDIRECT [[Kept]]")
            + page("Talk:Kept", 1, "chatter") + page("Empty", 0, "{{stub}}") + "</mediawiki>")
    assert list(iter_articles(io.BytesIO(dump.encode()))) == [("Kept", "Kept prose")]


@pytest.mark.real
@pytest.mark.parametrize(("name", "sizes"), [("wiki-sample", (86, 10, 10)), ("news-sample", (3030, 378, 378))])
def test_builtin_splits_are_fixed_disjoint_and_cover_the_corpus(name: str, sizes: tuple[int, int, int]) -> None:
    splits = {split: load_texts(name, split) for split in SPLITS}
    assert tuple(len(splits[s]) for s in SPLITS) == sizes
    train, validation, test = (set(splits[s]) for s in SPLITS)
    assert len(train | validation | test) == sum(sizes)  # disjoint, and no document repeated
    assert load_texts(name, "test") == splits["test"]  # same order on every call
    if name == "wiki-sample":
        assert splits["train"][0].startswith("Anarchism is a political philosophy")
        assert not any(marker in doc for doc in splits["train"] for marker in ("{{", "[[", "<ref", "'''", "__TOC__"))


def test_txt_documents_are_blank_line_separated(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n\n  second doc  \n \t\nthird\n\n")
    for split in SPLITS:  # local files have no split: every split is the whole file
        assert load_texts(path, split) == ["first doc\nstill first", "second doc", "third"]


def test_parquet_and_csv_fields(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert load_texts(tmp_path / "t.parquet", text_field="body") == ["alpha", "beta"]
    with pytest.raises(UsageError, match="columns are body, n; pass --text-field"):
        load_texts(tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("title,body\nx,\"a, quoted\ntext\"\ny,\nz\n")  # empty and missing cells
    assert load_texts(tmp_path / "t.csv", text_field="body") == ["a, quoted\ntext"]
    with pytest.raises(UsageError, match="fields are title, body"):
        load_texts(tmp_path / "t.csv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("list.json", json.dumps({"text": "x"}), "must hold a JSON list"),
     ("bad.jsonl", "{not json\n", "cannot parse"),
     ("empty.csv", "text\n", "holds no text"),
     ("noext", "words", "unknown data format"), ("x.parquet", "not parquet", "cannot parse"),
     ("rows.jsonl", "[1, 2]\n", "holds a list where a record")],
)
def test_bad_local_files_are_explained(tmp_path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=message):
        load_texts(tmp_path / name)


def test_source_key_changes_when_the_file_changes(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one")
    before = source_key(path, "train", None)
    path.write_text("one two")
    assert source_key(path, "train", None) != before
    assert source_key("wiki-sample", "test", None) == {"source": "wiki-sample", "split": "test"}
    with pytest.raises(UsageError, match="does not exist"):
        source_key(tmp_path / "gone.txt", "train", None)


class FakeDatasets(types.ModuleType):
    """Stands in for the ``datasets`` package: records each call, answers with ``rows`` or ``error``."""

    def __init__(self, rows: list[dict] | None = None, error: Exception | None = None) -> None:
        super().__init__("datasets")
        self.rows, self.error, self.calls = rows or [], error, []

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error:
            raise self.error
        return iter(self.rows)


def test_hub_names_map_to_their_datasets(monkeypatch, hub_reachable) -> None:
    fake = FakeDatasets([{"text": " = Title = \n"}, {"text": ""}, {"text": " Body \n"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts("wikitext2", "test") == [" = Title = \n", "", " Body \n"]  # empty rows kept: "\n\n".join protocol
    assert fake.calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    load_texts("c4", "test")
    assert fake.calls[-1] == (("allenai/c4", None), {
        "split": "validation", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "streaming": True})
    fake.rows = [{"sentence": "a b"}, {"sentence": " "}]
    assert load_texts("ptb", "validation") == ["a b"]
    assert fake.calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "validation"})


def test_hub_names_offline_name_the_builtins(monkeypatch, hub_reachable) -> None:
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(error=ConnectionError("Couldn't reach hf.co")))
    with pytest.raises(UsageError, match=r"Couldn't reach hf.co.*news-sample, wiki-sample"):
        load_texts("wikitext2", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(UsageError, match=r"needs the 'datasets' package"):
        load_texts("c4", "train")


def test_an_unreachable_hub_fails_fast_unless_the_user_asked_for_the_hf_cache(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(error=AssertionError("datasets was not to be asked")))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert not hub.hub_reachable()
    with pytest.raises(UsageError, match=r"cannot reach the Hugging Face hub to load 'wikitext2'.*HF_HUB_OFFLINE"):
        load_texts("wikitext2", "test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_requested()


def test_check_source_refuses_bad_names_without_reading(tmp_path) -> None:
    (tmp_path / "notes.md").write_text("text")
    for source, message in [("wiki-smaple", "unknown data source 'wiki-smaple'; use news-sample, wiki-sample"),
                            (tmp_path / "notes.md", "unknown data format .md"),
                            (tmp_path / "gone.jsonl", "does not exist")]:
        with pytest.raises(UsageError, match=message):
            check_source(source)
    with pytest.raises(UsageError, match="unknown split 'eval'"):
        check_source("wiki-sample", "eval")
    check_source("c4", "test")  # hub names are checked by name only: no network here
