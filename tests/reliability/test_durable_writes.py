"""Atomic writes survive a power loss, not only ``kill -9``: everything staged is fsynced before the
rename (so the new name can never point at data still in the page cache) and the destination's
folder after it (so the rename itself is on disk when the write returns).

The order is read from the destination itself: each ``os.fsync`` records the path its descriptor
names and what the destination holds at that moment, so a sync of staged data must see the old
state (or none) and the sync of the parent folder the new one, whichever rename the writer used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from layerprune.outputs import atomic_cache_dir, atomic_output_dir, write_json_atomic
from tests.helpers import record_text

MARKER = "layerprune.json"  # what makes a folder one --overwrite may replace


def version(target: Path) -> str | None:
    """Which write the destination holds now (a file, or a folder's record's ``reason``), or None if absent."""
    record = target / MARKER if target.is_dir() else target
    return json.loads(record.read_text())["reason"] if record.exists() else None


def marker(which: str) -> str:
    """A lineage record (what makes a folder one overwriting may replace) that says which write made it."""
    return json.dumps({**json.loads(record_text("layerprune-before-format-version.json")), "reason": which})


class SyncLog:
    """``os.fsync`` that records (path synced, ``version(target)`` at that moment) before syncing."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.calls: list[tuple[Path, str | None]] = []
        self._fsync = os.fsync

    def __call__(self, descriptor: int) -> None:
        self.calls.append((Path(os.readlink(f"/proc/self/fd/{descriptor}")), version(self.target)))
        self._fsync(descriptor)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Where outputs go, symlinks resolved (``/proc/self/fd`` names real paths)."""
    return tmp_path.resolve()


def install_log(monkeypatch: pytest.MonkeyPatch, target: Path) -> SyncLog:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a descriptor's path")
    log = SyncLog(target)
    monkeypatch.setattr(os, "fsync", log)
    return log


@pytest.mark.parametrize("old", [None, "old"], ids=["new-file", "overwrite"])
def test_a_file_is_synced_before_its_rename_and_its_folder_after(old: str | None, folder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = folder / "scores.json"
    if old is not None:
        target.write_text(json.dumps({"reason": old}))
    log = install_log(monkeypatch, target)
    write_json_atomic(target, {"reason": "new"})
    staged = [path for path, seen in log.calls if path.name.startswith(".scores.json.partial-")]
    assert staged and all(seen == old for path, seen in log.calls if path in staged), log.calls
    assert (folder, "new") in log.calls, log.calls


FolderWriter = Callable[[Path], object]  # a context manager yielding the staging folder for its target
FOLDER_WRITERS: dict[str, FolderWriter] = {
    "output": atomic_output_dir,
    "overwritten output": lambda target: atomic_output_dir(target, overwrite=True),
    "cache entry": atomic_cache_dir,
}


@pytest.mark.parametrize("writer", FOLDER_WRITERS)
def test_every_file_and_folder_staged_is_synced_before_the_rename_and_the_parent_after(
        writer: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = folder / "pruned"
    old = None
    if writer == "overwritten output":
        old = "old"
        target.mkdir()
        (target / MARKER).write_text(marker(old))
    log = install_log(monkeypatch, target)
    with FOLDER_WRITERS[writer](target) as staging:
        (staging / MARKER).write_text(marker("new"))
        (staging / "shards").mkdir()
        (staging / "shards" / "model.safetensors").write_bytes(b"\0" * 64)
        staged = {staging, staging / MARKER, staging / "shards", staging / "shards" / "model.safetensors"}
    synced_before = {path for path, seen in log.calls if seen == old}
    assert staged <= synced_before, (staged - synced_before, log.calls)
    assert (folder, "new") in log.calls, log.calls
