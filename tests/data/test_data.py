"""The data layer: markup stripping, fixed splits, window sampling, file formats, labelled sets."""

from __future__ import annotations

import json

import pytest
import torch

from layerprune.data import (
    build_calibration, load_instructions, load_texts, token_stream,
)
from layerprune.data.sources import split_of
from layerprune.data.wikitext import strip_markup
from layerprune.errors import UsageError
from layerprune.models.tiny import byte_tokenizer

TOKENIZER = byte_tokenizer()


def test_strip_markup_keeps_prose_and_drops_machinery() -> None:
    wiki = (
        "{{Infobox person|name={{nested|x}}|born=1900}}\n"
        "'''Ada''' was a [[mathematician|mathematics pioneer]] from [[London]].<ref>Some source</ref>"
        "<ref name=\"a\"/> See [http://example.org the site].<!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|A portrait]]\n"
        "{| class=\"wikitable\"\n| cell || cell\n|}\n"
        "== Early life ==\n* She wrote &quot;notes&quot;.\n"
        "== References ==\n* A book\n[[Category:People]]"
    )
    assert strip_markup(wiki) == (
        "Ada was a mathematics pioneer from London. See the site.\n\nEarly life\nShe wrote \"notes\"."
    )


def test_fixed_split_is_eight_one_one() -> None:
    assert [split_of(i) for i in range(10)] == ["train"] * 8 + ["validation", "test"]


@pytest.fixture
def text_file(tmp_path, private_cache):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document number {i} talks about topic {i % 7}." for i in range(40)))
    return path


def test_random_windows_are_seeded_slices_of_the_stream(text_file) -> None:
    stream = token_stream(TOKENIZER, text_file, split="train")
    first = build_calibration(TOKENIZER, text_file, samples=6, seq_len=16, seed=3)
    again = build_calibration(TOKENIZER, text_file, samples=6, seq_len=16, seed=3)
    other = build_calibration(TOKENIZER, text_file, samples=6, seq_len=16, seed=4)
    assert first.input_ids.shape == (6, 16) and bool(first.attention_mask.all())
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    text = TOKENIZER.decode(stream)
    for row in first.input_ids:
        assert TOKENIZER.decode(row) in text
    assert first.describe()["tokens"] == 96


def test_contiguous_windows_are_the_first_non_overlapping_slices(text_file) -> None:
    stream = token_stream(TOKENIZER, text_file)
    windows = build_calibration(TOKENIZER, text_file, samples=3, seq_len=20, sampling="contiguous")
    assert torch.equal(windows.input_ids, stream[:60].view(3, 20))
    assert TOKENIZER.bos_token_id not in windows.input_ids and TOKENIZER.eos_token_id not in windows.input_ids


def test_document_windows_pad_and_mask(text_file) -> None:
    windows = build_calibration(TOKENIZER, text_file, samples=5, seq_len=64, sampling="documents")
    lengths = windows.attention_mask.sum(dim=1)
    assert windows.input_ids.shape == (5, 64) and bool((lengths < 64).all())
    for row, length in zip(windows.input_ids, lengths.tolist()):
        assert bool((row[length:] == TOKENIZER.pad_token_id).all())
        assert TOKENIZER.decode(row[:length]).startswith("Document number")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"seq_len": 100000}, "fewer than seq_len"), ({"samples": 10**4, "sampling": "contiguous"}, "non-overlapping"),
     ({"sampling": "stride"}, "is not a choice of calibration"), ({"samples": 0}, "at least 1"),
     ({"seq_len": 64, "max_positions": 32}, "longer than the model's context")],
)
def test_bad_calibration_options_are_explained(text_file, options, message) -> None:
    with pytest.raises(UsageError, match=message):
        build_calibration(TOKENIZER, text_file, **{"samples": 2, "seq_len": 16, **options})


def test_local_formats_and_their_errors(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert load_texts(tmp_path / "a.jsonl", text_field="body") == ["one", "two"]
    with pytest.raises(UsageError, match="fields are body"):
        load_texts(tmp_path / "a.jsonl")
    (tmp_path / "b.csv").write_text("text,label\nhello,1\nworld,0\n")
    assert load_texts(tmp_path / "b.csv", split="test") == ["hello", "world"]
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x"}]))
    assert load_texts(tmp_path / "c.json") == ["x"]
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UsageError, match="no text"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(UsageError, match="unknown data format"):
        load_texts(tmp_path / "d.xml")
    with pytest.raises(UsageError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="unknown data source"):
        load_texts("no-such-corpus")
    with pytest.raises(UsageError, match="unknown split"):
        load_texts(tmp_path / "c.json", split="dev")


def test_instructions_format_prompt_and_response(tmp_path) -> None:
    path = tmp_path / "alpaca.jsonl"
    records = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Greet", "output": "Hi"}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    first, second = load_instructions(path)
    assert first.prompt.endswith("### Input:\n2 and 3\n\n### Response:\n") and first.response == "5"
    assert "### Input" not in second.prompt and second.response == "Hi"
    path.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(UsageError, match="record 1 lacks"):
        load_instructions(path)
