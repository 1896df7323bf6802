"""Stream-score a tiny checkpoint; run plainly or under ``torchrun`` (gloo, CPU), main process saves."""

from __future__ import annotations

import sys

import torch

from layerprune.distributed import process_state
from layerprune.scoring.streaming import stream_score

METRICS = "bi,angular,block-cosine,ppl"


def rows() -> torch.Tensor:
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))


def importance(folder: str) -> dict[str, list[float]]:
    report = stream_score(folder, rows(), METRICS, batch_size=2)
    return {name: result.importance for name, result in report.results.items()}


if __name__ == "__main__":
    scores = importance(sys.argv[1])
    state = process_state()
    if state.is_main_process:
        torch.save({"scores": scores, "processes": state.num_processes}, sys.argv[2])
