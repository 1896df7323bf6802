"""FSDP2 on two CPU processes (gloo): the checkpoint and the export hold whole tensors equal to a
single-process run's, and resuming an interrupted sharded run gives the uninterrupted result.

The sharded runs are in ``fsdp_run.py`` (one launch for every case: a launch costs more than the
runs); the references here are plain single-process runs, which gather nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerprune.healing import heal
from layerprune.healing.engine import STATE_FILE
from tests.healing.conftest import pruned_pair, training_rows
from tests.healing.distributed_run import TRAINING, healed_state
from tests.healing.fsdp_run import CHECKPOINT_EVERY

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}  # as the DDP test: another batch split moves weights by ~1e-1


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests" / "healing" / "fsdp_run.py"), str(out)]
    # src first: the launched processes must import this checkout's layerprune, not an installed one
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
                        "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = torch.load(out / "facts.pt", weights_only=True)
    assert facts["processes"] == 2
    assert all(facts["sharded"].values()), f"FSDP did not shard every parameter: {facts['sharded']}"
    return out


@pytest.mark.parametrize("method", ["partial-ft", "lora"])
def test_fsdp_export_holds_the_whole_model(method: str, fsdp_out: Path) -> None:
    exported = load_file(fsdp_out / method / "model.safetensors")
    one = healed_state(method)
    assert exported.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(exported[name], one[name], **TOLERANCE, msg=name)


def test_fsdp_checkpoint_holds_whole_trainable_tensors(fsdp_out: Path, tmp_path: Path) -> None:
    original, pruned = pruned_pair()
    assert TRAINING["steps"] % CHECKPOINT_EVERY, "the last checkpoint must be the one of the interrupted run"
    heal(pruned, "partial-ft", training_rows(), original=original, checkpoint_dir=tmp_path,
         checkpoint_every=CHECKPOINT_EVERY, **TRAINING)
    one = torch.load(tmp_path / STATE_FILE, weights_only=True)["params"]
    sharded_run = torch.load(fsdp_out / "facts.pt", weights_only=True)["checkpoint_params"]
    assert sharded_run.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(sharded_run[name], one[name], **TOLERANCE, msg=name)


def test_fsdp_resume_equals_uninterrupted_run(fsdp_out: Path) -> None:
    uninterrupted = load_file(fsdp_out / "partial-ft" / "model.safetensors")
    resumed = load_file(fsdp_out / "partial-ft-resumed" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
