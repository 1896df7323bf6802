"""Heal a tiny pruned model and save its final weights; run plainly or under ``accelerate launch``.

(``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x unless
an MPI hostfile is given; ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``
(or ``torchrun``) gives two gloo CPU processes, and the file records how many really took part.)
"""

from __future__ import annotations

import sys

import torch

from layerprune.distributed import process_state
from layerprune.healing import heal
from tests.healing.conftest import pruned_pair, training_rows

TRAINING = dict(steps=6, batch_size=4, lr=1e-2)
OWN_OPTIONS = {"partial-ft": dict(train_layers=2)}  # each method takes only its own options


def training_options(method: str) -> dict:
    """The options the tests heal ``method`` with: the shared ones and, where it has them, its own."""
    return TRAINING | OWN_OPTIONS.get(method, {})


def healed_state(method: str) -> dict[str, torch.Tensor]:
    original, pruned = pruned_pair()
    healed = heal(pruned, method, training_rows(), original=original, **training_options(method))
    return {k: v.detach().clone() for k, v in healed.model.state_dict().items()}


if __name__ == "__main__":
    state = healed_state(sys.argv[1])
    if process_state().is_main_process:
        torch.save({"state": state, "processes": process_state().num_processes}, sys.argv[2])
