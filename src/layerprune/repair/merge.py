"""``merge`` (LaCo, layer collapse): fold a removed run's parameter differences into the layer kept before it.

``θ_{a-1} ← θ_{a-1} + w · Σ_k (θ_k − θ_{a-1})`` over the removed layers ``k`` of ``[a, b)``, for
every parameter of the layer; ``w = 1`` is LaCo's rule. It reads weights only: no calibration pass.
The sum is linear in the weights, so Gemma's ``(1 + w)`` norm convention needs no special case.
"""

from __future__ import annotations

from typing import Any

import torch

from layerprune.errors import UsageError
from layerprune.models.loading import LoadedModel
from layerprune.options import Config, option
from layerprune.repair.base import REPAIRS, RepairMethod
from layerprune.repair.statistics import RunStatistics


class MergeOptions(Config):
    """How strongly ``merge`` folds the removed layers in."""

    unit = "merge"

    merge_weight: float = option(1.0, "w in θ ← θ + w·Σ(θ_k − θ): the share of each removed layer's difference "
                                 "merged in (LaCo: 1)")


def merge_run(layers: torch.nn.ModuleList, start: int, end: int, weight: float) -> None:
    """Apply LaCo's rule to ``layers[start - 1]`` with the layers ``[start, end)``."""
    kept = dict(layers[start - 1].named_parameters())
    for index in range(start, end):
        names = {name for name, _ in layers[index].named_parameters()}
        if names != set(kept):
            raise UsageError(f"layer {index} does not have the parameters of layer {start - 1} "
                             f"({sorted(names ^ set(kept))[:3]} differ); merge needs layers of one shape")
    removed = [dict(layers[index].named_parameters()) for index in range(start, end)]
    with torch.no_grad():
        for name, parameter in kept.items():
            base = parameter.detach().to(torch.float64)
            difference = sum(layer[name].detach().to(torch.float64) - base for layer in removed)
            parameter.copy_((base + weight * difference).to(parameter.dtype))


class Merge(RepairMethod):
    name = "merge"
    cost = 0
    options_class = MergeOptions
    needs_statistics = False

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: MergeOptions) -> None:
        self.refuse_first_layer(runs, "merges the removed layers into")  # weights only: any family will do

    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: MergeOptions) -> tuple[list[dict[str, Any]], str]:
        layers = loaded.adapter.decoder_layers(loaded.model)
        for start, end in runs:
            merge_run(layers, start, end, options.merge_weight)
        note = (f"each removed run was merged into the layer kept before it, θ ← θ + {options.merge_weight:g}·Σ(θ_k − θ) "
                "(LaCo)")
        return [{"merge_weight": options.merge_weight} for _ in runs], note


REPAIRS.register(Merge.name)(Merge())
