"""``reverse-order`` and ``random``: the baselines every layer-importance metric must beat.

Reverse order removes layers from the top, which is exactly "keep the first k layers" (Why Lift so
Heavy) and the strong baseline of Reassessing Layer Pruning. Random is seeded, so a run can be
repeated.
"""

from __future__ import annotations


import torch

from layerprune.options import Config, SEED_RANGE, option
from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext


class RandomOptions(Config):
    unit = "random"

    seed: int = option(0, "seed of the random importance (the command line's --seed)", minimum=SEED_RANGE[0],
                       maximum=SEED_RANGE[1])


class ReverseOrder(Metric):
    needs_data = False
    baseline = True
    streaming_refusal = None
    meaning = "importance = number of layers below and including it; the top layer is the least important"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        count = context.loaded.num_layers
        importance = [float(count - i) for i in range(count)]
        return MetricResult(name, importance, importance, self.meaning)


class RandomOrder(Metric):
    options_class = RandomOptions
    needs_data = False
    baseline = True
    streaming_refusal = None
    meaning = "uniform random importance in [0, 1), seeded by --seed"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        generator = torch.Generator().manual_seed(context.options_of(self).seed)
        importance = torch.rand(context.loaded.num_layers, generator=generator, dtype=torch.float64).tolist()
        return MetricResult(name, importance, importance, self.meaning)


METRICS.register("reverse-order")(ReverseOrder())
METRICS.register("random")(RandomOrder())
