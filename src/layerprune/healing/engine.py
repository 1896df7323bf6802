"""The one training loop every healing method uses, on top of ``accelerate``.

Why a loop of our own and not the Trainer: healing trains a handful of parameters on rows that may
live in memory-mapped files (replacement pairs), with losses that are sums over tokens. The loop
keeps three promises the tests check:

* **Same result on 1 or N processes.** Step ``s`` always uses the same global batch (a seeded
  permutation per epoch); each process takes its slice of it, and the summed loss is divided by
  the *global* normaliser, so the gradient DDP averages equals the single-process gradient.
  ``accelerate launch --num_processes N`` (DDP, FSDP) needs no code change.
* **Resume gives the same result as an uninterrupted run.** A checkpoint holds the trainable
  parameters, optimizer, schedule, RNG and step; the batch order is a function of the step.
* **Frozen parameters stay bit-identical.** Only ``requires_grad`` parameters reach the optimizer.

Under FSDP each process holds only a shard of every parameter and of its optimizer state, so the
checkpoint and the exported model are gathered into full tensors (``torch.distributed.checkpoint``'s
state-dict API, which accelerate's own FSDP2 saving uses) and written by the main process; a resume
scatters them back into the shards of however the run is sharded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from layerprune.errors import OptionError, UsageError
from layerprune.healing.base import HealConfig
from layerprune.outputs import atomic_file
from layerprune.progress import Progress

STATE_FILE = "heal-state.pt"
WARMUP_FRACTION = 0.05
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full tensors on the main process's CPU (empty elsewhere), gathered one tensor at a time, so no
GPU ever holds the whole model."""
GATHERED_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
"""The same for a checkpoint, which holds only the trainable parameters: frozen weights are never
gathered (a partial fine-tune of a 70B model gathers its last layers, not the 70B)."""
FULL_INPUT = StateDictOptions(full_state_dict=True, strict=False)
"""Full tensors in, each process keeping its shard; ``strict=False`` because the frozen weights are absent."""


class Rows(Protocol):
    """Training rows addressable by index (in memory or memory-mapped)."""

    def __len__(self) -> int: ...

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""Summed (not averaged) loss of a batch, so that batches split across processes add up."""
WeightFn = Callable[[list[int]], float]
"""How many loss terms the given rows contribute: the normaliser of the summed loss."""


@dataclass
class TrainReport:
    losses: list[float]
    seconds: float
    trainable_parameters: int


@lru_cache(maxsize=4)
def _permutation(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(size, generator=generator).tolist())


def global_rows(step: int, batch_size: int, size: int, seed: int) -> list[int]:
    """The rows of global batch ``step``: consecutive slices of one seeded permutation per epoch."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, size)
        rows.append(_permutation(size, seed, epoch)[offset])
    return rows


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak rate."""
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def mixed_precision(precision: str) -> str:
    """bfloat16 autocast where asked, or by default where the GPU supports it; float32 otherwise
    (accelerate's names: ``bf16`` / ``no``)."""
    if precision == "bfloat16" or (precision == "auto" and torch.cuda.is_available()
                                   and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "no"


def check_resumable(settings: HealConfig, fingerprint: dict[str, Any]) -> None:
    """Before any expensive work: a ``--resume`` must find a checkpoint of the very same run."""
    if not settings.resume:
        return
    path = Path(settings.checkpoint_dir or ".") / STATE_FILE
    if not path.is_file():
        raise OptionError.about("resume", f"was asked for but {path} does not exist; start afresh without it")
    saved = torch.load(path, map_location="cpu", weights_only=True)["fingerprint"]
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise UsageError(f"the checkpoint in {path.parent} is from a run with different {', '.join(changed)}; "
                         "use the same settings to resume, or a new --checkpoint-dir to start afresh")


def train(model: nn.Module, rows: Rows, loss_fn: LossFn, weight_fn: WeightFn, settings: HealConfig, *,
          lr: float, fingerprint: dict[str, Any], companions: Sequence[nn.Module] = (),
          label: str = "healing") -> TrainReport:
    """Train ``model``'s ``requires_grad`` parameters for ``settings.training.steps`` steps.

    ``companions`` are frozen models the loss uses (a distillation teacher); they are moved to
    the training device but never wrapped or optimised.
    """
    options = settings.training
    accelerator = Accelerator(mixed_precision=mixed_precision(options.precision))
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise UsageError("healing under FSDP needs FSDP2: FSDP1's flat parameters cannot be gathered from the model "
                         "for its checkpoint and export; set fsdp_version: 2 in the accelerate config")
    processes = accelerator.num_processes
    if options.batch_size % processes:
        raise UsageError(f"batch size {options.batch_size} does not split over {processes} processes; "
                         f"use a multiple of {processes}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError(f"{label}: no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.steps))
    for companion in companions:
        companion.to(accelerator.device)
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    state_path = Path(settings.checkpoint_dir) / STATE_FILE if settings.checkpoint_dir else None
    losses: list[float] = []
    start = 0
    if settings.resume and state_path is not None:
        start, losses = _load_state(state_path, wrapped, optimizer, scheduler)
    share = options.batch_size // processes
    first = accelerator.process_index * share
    begun = time.perf_counter()
    bar = Progress(label, options.steps, unit="steps", done=start, shown=accelerator.is_local_main_process)
    for step in range(start, options.steps):
        batch_rows = global_rows(step, options.batch_size, len(rows), options.seed)
        normaliser = max(weight_fn(batch_rows), 1.0)
        batch = {k: v.to(accelerator.device) for k, v in rows.take(batch_rows[first:first + share]).items()}
        with accelerator.autocast():
            loss_sum = loss_fn(wrapped, batch)
        accelerator.backward(loss_sum * processes / normaliser)
        # all of the prepared model's parameters (frozen ones have no gradient): under FSDP these are
        # the shards, the only list accelerate clips with one norm over every process
        accelerator.clip_grad_norm_(list(wrapped.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss_sum.detach().float(), "sum").item() / normaliser)
        bar.note(f"loss {losses[-1]:.4f}")
        bar.update()
        done = step + 1
        if state_path is not None and settings.checkpoint_interval and done % settings.checkpoint_interval == 0:
            checkpoint = _gather_checkpoint(wrapped, optimizer, scheduler, done, losses, fingerprint)
            if accelerator.is_main_process:
                _save_state(state_path, checkpoint)
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.wait_for_everyone()
    # prepare() put the bf16 autocast around the model's forward; take it off, so that the healed
    # model computes in memory as it will once exported and reloaded
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    model.eval()
    return TrainReport(losses, time.perf_counter() - begun, sum(p.numel() for p in trainable))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's wrapper. The state-dict API reads its parameter groups and
    state, and steps it once (at learning rate 0) to create a state it lacks; that is the plain
    optimizer's business, not the wrapper's, which adds gradient-scaler and accumulation bookkeeping."""
    return getattr(optimizer, "optimizer", optimizer)


def _gather_checkpoint(wrapped: nn.Module, optimizer: Any, scheduler: Any, step: int, losses: list[float],
                       fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint: full trainable parameters and optimizer state, gathered from every process's
    shards, keyed by parameter name (so it does not depend on how the run is sharded). Every process
    must call it; only the main process's copy holds the tensors."""
    params, optimizer_state = get_state_dict(wrapped, _torch_optimizer(optimizer), options=GATHERED_TRAINABLE)
    return {"step": step, "fingerprint": fingerprint, "losses": losses, "rng": torch.get_rng_state(),
            "params": params, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically: never half a checkpoint."""
    with atomic_file(path) as staging:
        torch.save(state, staging)


def _load_state(path: Path, wrapped: nn.Module, optimizer: Any, scheduler: Any) -> tuple[int, list[float]]:
    """Every process reads the full checkpoint and keeps its own shard of each tensor."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(wrapped, _torch_optimizer(optimizer), model_state_dict=state["params"],
                   optim_state_dict=state["optimizer"], options=FULL_INPUT)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


def gather_for_export(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of an FSDP-sharded ``model``, so that saving it from the main process writes
    whole tensors, not this process's shards; ``None`` for a model that is not sharded, and on every
    process but the main one (which keep only their shards).

    Every process must call it (it is collective); the main process holds the gathered weights on
    its CPU.
    """
    if not any(isinstance(parameter, DTensor) for parameter in model.parameters()):
        return None
    return get_model_state_dict(model, options=GATHERED) or None
