"""Output files can be shared: they get the mode the umask gives a plainly created file.

safetensors writes ``model.safetensors`` through a private temporary file (mode 0600), and shard
surgery copies side files with their source's mode; neither may decide who can read an export.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerprune.cli.main import main
from tests.helpers import save_tiny_checkpoint

# (umask, mode every output file must have, mode every output folder must have), written out by hand
UMASK_ROWS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
UMASK_IDS = ["umask-022", "umask-077"]


@pytest.fixture(scope="module")
def private_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose files only their owner may read, so no output can inherit a share-able mode."""
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("private") / "model", "llama", 4)
    for path in folder.iterdir():
        path.chmod(0o600)
    return folder


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder.parent)): stat.S_IMODE(path.stat().st_mode)
            for path in (folder, *folder.rglob("*"))}


def expected(folder: Path, file_mode: int, dir_mode: int) -> dict[str, int]:
    return {str(path.relative_to(folder.parent)): dir_mode if path.is_dir() else file_mode
            for path in (folder, *folder.rglob("*"))}


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), UMASK_ROWS, indirect=["umask"], ids=UMASK_IDS)
@pytest.mark.parametrize("how", [["--generate", "ab", "--max-new-tokens", "2"], []],
                         ids=["in-memory", "shard-surgery"])
def test_an_exported_model_follows_the_umask(how: list[str], umask: int, file_mode: int, dir_mode: int,
                                             private_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(private_source), "--layers", "1", "--out", str(out), *how]) == 0
    assert (out / "model.safetensors").is_file()
    assert modes(out) == expected(out, file_mode, dir_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), UMASK_ROWS, indirect=["umask"], ids=UMASK_IDS)
def test_score_files_follow_the_umask(umask: int, file_mode: int, dir_mode: int, private_source: Path,
                                      tmp_path: Path) -> None:
    output = tmp_path / "scores.json"
    assert main(["score", "--model", str(private_source), "--metrics", "magnitude-l1", "--output", str(output)]) == 0
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()} == {
        "scores.json": file_mode, "scores.png": file_mode}
