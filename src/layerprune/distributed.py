"""This process's place in a multi-process run, and the one reduction the toolkit needs.

Healing (``accelerate launch``) and streaming scoring (``torchrun``) both split work over the
processes a launcher started; both ask here, so "which process am I, how many are we, am I the one
that writes" has one answer however the run was launched, and a single process needs no launcher
and no process group.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """This process's rank, the world size and whether it is the main process.

    Built as ``Accelerator`` builds it: a bare ``PartialState()`` ignores ``ACCELERATE_USE_CPU`` and
    would see one process where a CPU launch started several. Asking for it also sets up the
    process group under a launcher, which :func:`all_reduce_sums` then uses.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def all_reduce_sums(*tensors: torch.Tensor) -> None:
    """Sum ``tensors`` in place across processes, if there are several (sums and counts only:
    every streaming accumulator is a sum, so the reduction is exact up to float addition order)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)
