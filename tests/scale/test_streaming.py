"""Layer-streaming scoring equals in-memory scoring (``layerprune.scoring.score``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.data import CalibrationSet
from layerprune.errors import UsageError
from layerprune.scoring import score
from layerprune.models.tiny import tiny_model
from layerprune.scoring.streaming import stream_score
from tests.conftest import FAMILIES
from tests.helpers import save_tiny_checkpoint
from tests.scale.distributed_score import METRICS as DISTRIBUTED_METRICS
from tests.scale.distributed_score import importance

ROOT = Path(__file__).resolve().parents[2]
ALL = "bi,angular,block-cosine,ppl,magnitude-l1,magnitude-l2,reverse-order,random"


def calibration() -> CalibrationSet:
    """Rows with padding on either side, so masks and scored positions matter."""
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, :5] = 0
    return CalibrationSet(ids, mask)


def assert_same_scores(streamed: lp.scoring.ScoreReport, reference: lp.scoring.ScoreReport) -> None:
    """Equal up to float32 summation order: cosines agree to ~1e-7, and arccos near cos = 1
    (deep layers barely turn their input) magnifies that to ~1e-5 in the angular distance."""
    assert streamed.results.keys() == reference.results.keys()
    for name, expected in reference.results.items():
        got = streamed.results[name]
        torch.testing.assert_close(torch.tensor(got.importance), torch.tensor(expected.importance),
                                   rtol=1e-4, atol=1e-5)
        if expected.blocks is not None:
            for n, row in expected.blocks.items():
                torch.testing.assert_close(torch.tensor(got.blocks[n]), torch.tensor(row), rtol=1e-4, atol=1e-5)
        assert got.details.keys() == expected.details.keys()
    assert streamed.num_layers == reference.num_layers and streamed.tokens == reference.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_in_memory_scoring(family: str, tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / "model", family, num_layers=5, max_shard_size="30KB")
    reference = score(lp.load_model(folder), calibration(), ALL, batch_size=2)
    assert len(set(reference.results["bi"].importance)) == 5  # layers differ, so a mix-up would show
    assert_same_scores(stream_score(folder, calibration(), ALL, batch_size=2), reference)


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_spilled_activations_and_last_positions_give_the_same_scores(family: str, tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / "model", family, num_layers=5)
    reference = score(lp.load_model(folder), calibration(), "bi,angular,ppl", batch_size=3, positions="last")
    spill = tmp_path / "spill"
    spill.mkdir()
    streamed = stream_score(folder, calibration(), "bi,angular,ppl", batch_size=3, positions="last", spill_dir=spill)
    assert_same_scores(streamed, reference)
    assert not any(spill.iterdir()), "spilled activations must be deleted afterwards"


def test_refuses_what_cannot_stream_before_loading(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / "model", "llama")
    with pytest.raises(UsageError, match="taylor"):
        stream_score(folder, calibration(), "bi,taylor")
    with pytest.raises(UsageError, match="need calibration data"):
        stream_score(folder, None, "ppl")
    with pytest.raises(UsageError, match="no config.json"):
        stream_score(tmp_path, calibration(), "bi")


def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: each streams half the rows, the sums are all-reduced."""
    folder = save_tiny_checkpoint(tmp_path / "model", "qwen3", num_layers=4)
    out = tmp_path / "two.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(ROOT / "tests" / "scale" / "distributed_score.py"), str(folder), str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["processes"] == 2
    one = importance(str(folder))
    assert set(one) == set(DISTRIBUTED_METRICS.split(","))
    for name, values in one.items():
        torch.testing.assert_close(torch.tensor(saved["scores"][name]), torch.tensor(values), rtol=1e-6, atol=1e-7)


@pytest.mark.real
def test_smollm2_streaming_equals_in_memory(smollm2_sharded: Path) -> None:
    rows = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = score(lp.load_model(smollm2_sharded), rows, "bi,angular,ppl", batch_size=2)
    assert_same_scores(stream_score(smollm2_sharded, rows, "bi,angular,ppl", batch_size=2), reference)


def test_gpt2_base_checkpoint_streams_under_its_own_names(tmp_path: Path) -> None:
    """Base GPT-2 checkpoints name tensors ``h.0.``/``wte`` (no ``transformer.``) and store no LM head."""
    model = tiny_model("gpt2", 5)
    model.transformer.save_pretrained(tmp_path / "base")
    model.config.save_pretrained(tmp_path / "base")
    reference = score(lp.load_model(tmp_path / "base"), calibration(), "bi,angular,ppl", batch_size=2)
    assert_same_scores(stream_score(tmp_path / "base", calibration(), "bi,angular,ppl", batch_size=2), reference)
