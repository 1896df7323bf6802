"""A tiny checkpoint, calibration text and separate held-out text for the search tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import save_tiny_checkpoint, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("search")
    held_out = folder / "held-out.txt"
    held_out.write_text("\n\n".join(f"Entry {i}: {i * 3} comes after {i}, before {i + 1}." for i in range(300)))
    return {"model": save_tiny_checkpoint(folder / "tiny-llama", "llama", 6),
            "calibration": write_corpus(folder / "calibration.txt"), "held_out": held_out, "folder": folder}
