"""Checkpoints on disk for the scale tests: tiny models of every family and SmolLM2 in shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer



@pytest.fixture(scope="session")
def smollm2_sharded(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M (float32) re-saved in 100 MB shards, as big checkpoints ship."""
    folder = tmp_path_factory.mktemp("smollm2") / "sharded"
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32").save_pretrained(folder, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return folder
