"""Token streams and calibration windows against the plain reference: tokenize the joined text once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import layerprune.data.calibration as calibration
from layerprune.data import build_calibration, load_texts, text_prefix, token_stream
from layerprune.errors import UsageError
from layerprune.models.tiny import byte_tokenizer
from layerprune.cli.main import main
from tests.helpers import bos_tokenizer, save_tiny_checkpoint

TOKENIZER = byte_tokenizer()


@pytest.fixture
def corpus(tmp_path, private_cache) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Doc {i}: " + "word " * (i % 9) for i in range(30)))
    return path


def reference_ids(tokenizer, path: Path) -> list[int]:
    return tokenizer("\n\n".join(load_texts(path)), add_special_tokens=False)["input_ids"]


def test_token_stream_is_the_joined_text_tokenized_once_and_cached(corpus, monkeypatch) -> None:
    stream = token_stream(TOKENIZER, corpus)
    assert stream.dtype == torch.long and stream.tolist() == reference_ids(TOKENIZER, corpus)

    def no_tokenizing(*_):
        raise AssertionError("the cached stream should be reused")

    monkeypatch.setattr(calibration, "_tokenize", no_tokenizing)
    assert torch.equal(token_stream(TOKENIZER, corpus), stream)
    corpus.write_text("edited text")  # an edited file is tokenized again
    with pytest.raises(AssertionError, match="cached stream"):
        token_stream(TOKENIZER, corpus)


def test_batches_cover_the_rows_in_order(corpus) -> None:
    windows = build_calibration(TOKENIZER, corpus, samples=5, seq_len=8)
    batches = list(windows.batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), windows.input_ids)
    assert torch.equal(torch.cat([b["attention_mask"] for b in batches]), windows.attention_mask)
    assert windows.describe() == {"source": str(corpus), "split": "train", "samples": 5, "seq_len": 8, "seed": 0,
                                  "sampling": "random", "tokens": 40}


def test_random_windows_start_at_the_seeded_offsets(corpus) -> None:
    stream = token_stream(TOKENIZER, corpus)
    windows = build_calibration(TOKENIZER, corpus, samples=4, seq_len=10, seed=7)
    starts = torch.randint(0, stream.numel() - 10 + 1, (4,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(windows.input_ids, torch.stack([stream[s:s + 10] for s in starts.tolist()]))


def test_document_windows_are_seeded_truncated_and_masked(corpus) -> None:
    first = build_calibration(TOKENIZER, corpus, samples=30, seq_len=12, sampling="documents", seed=1)
    again = build_calibration(TOKENIZER, corpus, samples=30, seq_len=12, sampling="documents", seed=1)
    other = build_calibration(TOKENIZER, corpus, samples=30, seq_len=12, sampling="documents", seed=2)
    assert torch.equal(first.input_ids, again.input_ids) and not torch.equal(first.input_ids, other.input_ids)
    expected = sorted(TOKENIZER.decode(TOKENIZER(doc, add_special_tokens=False)["input_ids"][:12])
                      for doc in load_texts(corpus))
    lengths = first.attention_mask.sum(dim=1).tolist()
    assert sorted(TOKENIZER.decode(row[:n]) for row, n in zip(first.input_ids, lengths)) == expected
    assert min(lengths) < 12 == max(lengths)  # short documents padded, long ones truncated
    with pytest.raises(UsageError, match="holds 30 documents, fewer than samples 31"):
        build_calibration(TOKENIZER, corpus, samples=31, seq_len=12, sampling="documents")


def test_windows_start_with_the_tokens_the_tokenizer_puts_before_text(corpus) -> None:
    """Gemma-like tokenizers start every text with <bos>: so does every window, then seq_len - 1
    text tokens at the same seeded offsets (the stream itself has no special tokens)."""
    tokenizer = bos_tokenizer()
    assert text_prefix(TOKENIZER) == [] and text_prefix(tokenizer) == [257]
    stream = token_stream(tokenizer, corpus)
    assert torch.equal(stream, token_stream(TOKENIZER, corpus))
    windows = build_calibration(tokenizer, corpus, samples=4, seq_len=10, seed=7)
    starts = torch.randint(0, stream.numel() - 9 + 1, (4,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(windows.input_ids[:, 0], torch.full((4,), 257))
    assert torch.equal(windows.input_ids[:, 1:], torch.stack([stream[s:s + 9] for s in starts.tolist()]))
    assert windows.info["prefix"] == [257] and windows.tokens == 40
    contiguous = build_calibration(tokenizer, corpus, samples=3, seq_len=10, sampling="contiguous")
    assert torch.equal(contiguous.input_ids[:, 1:].reshape(-1), stream[:27])
    documents = build_calibration(tokenizer, corpus, samples=30, seq_len=12, sampling="documents")
    assert (documents.input_ids[:, 0] == 257).all() and documents.attention_mask.sum(dim=1).max() == 12
    with pytest.raises(UsageError, match="leaves no room for text after the tokenizer's 2 start token"):
        build_calibration(bos_tokenizer(starts=2), corpus, samples=1, seq_len=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"seq_len": 1}, "at least 2"), ({"split": "dev"}, "unknown split"),
     ({"samples": 1000, "seq_len": 100, "sampling": "contiguous"}, r"holds only \d+ non-overlapping windows")],
)
def test_more_bad_options_fail_before_tokenizing(corpus, monkeypatch, options, message) -> None:
    if "sampling" not in options:
        monkeypatch.setattr(calibration, "_tokenize", lambda *_: pytest.fail("tokenized before validating"))
    with pytest.raises(UsageError, match=message):
        build_calibration(TOKENIZER, corpus, **{"samples": 2, "seq_len": 8, **options})


def test_text_shorter_than_one_window_says_how_many_tokens(tmp_path, private_cache, capsys) -> None:
    """Python names the options by their keywords, the command line by its flags (the same error)."""
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(UsageError, match="has 4 tokens, fewer than seq_len 8; lower seq_len or use more data$"):
        build_calibration(TOKENIZER, tmp_path / "short.txt", samples=1, seq_len=8)
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 2)
    assert main(["score", "--model", str(model), "--data", str(tmp_path / "short.txt"), "--samples", "1",
                 "--seq-len", "8", "--output", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.endswith("fewer than --seq-len 8; lower --seq-len or use more data\n")


@pytest.mark.real
def test_smollm2_stream_matches_its_tokenizer_without_special_tokens(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    documents = load_texts("wiki-sample", "test")
    stream = token_stream(tokenizer, "wiki-sample", "test")
    assert stream.tolist() == tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    windows = build_calibration(tokenizer, "wiki-sample", split="test", samples=8, seq_len=256, sampling="contiguous")
    assert torch.equal(windows.input_ids, stream[:8 * 256].view(8, 256))
    assert not set(windows.input_ids.unique().tolist()) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(windows.input_ids[0]).startswith(documents[0][:40])
