"""The `layerprune prune` and `layerprune info` commands, end to end in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.models.tiny import tiny_model
from tests.helpers import save_tiny_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerprune.cli.main", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


def test_info_reports_family_and_layers(tiny_dir: Path) -> None:
    result = run_cli("info", "--model", str(tiny_dir), "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["family"] == "gemma"
    assert details["num_layers"] == 6
    assert details["parameters"] == sum(p.numel() for p in tiny_model("gemma3", 6).parameters())


def test_prune_writes_a_plain_checkpoint_and_generates(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = run_cli("prune", "--model", str(tiny_dir), "--layers", "1,3-4", "--out", str(out),
                     "--generate", "abc", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "removed layers [1, 3, 4]: 6 -> 3 layers" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("abc")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    assert json.loads((out / "layerprune.json").read_text())["removed_layers"] == [1, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "no staging folder may be left behind"
    ids = torch.tensor([[5, 6, 7]])
    assert reloaded(ids).logits.shape == (1, 3, 260)


def test_prune_without_layers_explains_how(tiny_dir: Path, tmp_path: Path) -> None:
    result = run_cli("prune", "--model", str(tiny_dir), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "--layers" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
