"""Heal tiny pruned models under accelerate's FSDP2 on CPU processes (gloo) and export them.

accelerate 1.x turns FSDP on only for GPU-type launches (``MULTI_GPU``, ``MULTI_XPU``, ...): with
``ACCELERATE_USE_CPU=1`` the processes are ``MULTI_CPU`` and ``ACCELERATE_USE_FSDP`` is silently
ignored. ``FSDPOnCPU`` sets the distributed type and the FSDP2 plugin that an FSDP launch would set,
so everything after it is accelerate's own FSDP2 code (``fully_shard`` on a CPU device mesh), and
the healing engine under test runs unchanged.

Run under ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1``:
``fsdp_run.py OUT`` writes ``OUT/<case>`` exports and ``OUT/facts.pt`` (main process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

import layerprune as lp
from layerprune.distributed import process_state
from layerprune.errors import UsageError
from layerprune.healing import engine, heal
from layerprune.healing.engine import STATE_FILE
from tests.healing.conftest import pruned_pair, training_rows
from tests.healing.distributed_run import TRAINING

CRASH_STEP = 5
CHECKPOINT_EVERY = 4


class FSDPOnCPU(Accelerator):
    """An ``Accelerator`` as an FSDP2 launch configures it, on the CPU processes of a gloo launch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT")


def heal_and_export(method: str, out: Path, **options) -> bool:
    """Heal a fresh pruned pair; every process takes part, the main process exports, and the others
    must refuse to export their shards. Returns whether the healed model was really sharded (else
    the export would not test the gather)."""
    original, pruned = pruned_pair()
    healed = heal(pruned, method, training_rows(), original=original, **(TRAINING | options))
    if process_state().is_main_process:
        lp.save(healed, out)
    else:
        try:
            lp.save(healed, out.with_name(f"{out.name}-shards"))
        except UsageError:
            pass
        else:
            raise AssertionError("a process that holds only shards exported them")
    return all(isinstance(parameter, DTensor) for parameter in healed.model.parameters())


def crash_then_resume(method: str, out: Path, checkpoints: Path) -> dict[str, torch.Tensor]:
    """Interrupt a checkpointed run after step ``CRASH_STEP``, resume it, export; returns the checkpoint's tensors."""
    real_rows = engine.global_rows

    def crash(step: int, *args):
        if step == CRASH_STEP:
            raise KeyboardInterrupt
        return real_rows(step, *args)

    engine.global_rows = crash
    try:
        heal_and_export(method, out, checkpoint_dir=checkpoints, checkpoint_every=CHECKPOINT_EVERY)
        raise AssertionError(f"the run was not interrupted at step {CRASH_STEP}")
    except KeyboardInterrupt:
        pass
    finally:
        engine.global_rows = real_rows
    saved = torch.load(checkpoints / STATE_FILE, weights_only=True)
    heal_and_export(method, out, checkpoint_dir=checkpoints, checkpoint_every=CHECKPOINT_EVERY, resume=True)
    return saved["params"]


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    engine.Accelerator = FSDPOnCPU
    sharded = {method: heal_and_export(method, folder / method) for method in ("partial-ft", "lora")}
    checkpoint_params = crash_then_resume("partial-ft", folder / "partial-ft-resumed", folder / "checkpoints")
    if process_state().is_main_process:
        torch.save({"processes": process_state().num_processes, "sharded": sharded,
                    "checkpoint_params": checkpoint_params}, folder / "facts.pt")
