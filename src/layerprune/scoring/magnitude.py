"""``magnitude-l1`` / ``magnitude-l2``: how large a layer's weights are.

As in Reassessing Layer Pruning, a layer's importance is the sum, over every weight tensor of the
layer, of that tensor's entrywise L1 (or L2) norm. It needs no data; norms are taken in float64 so
bfloat16 weights give the same ranking as their float32 originals.
"""

from __future__ import annotations

import torch

from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext


class WeightMagnitude(Metric):
    needs_data = False

    def __init__(self, order: int) -> None:
        self.order = order
        self.meaning = f"sum over the layer's weight tensors of their L{order} norm; higher = more important"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        loaded = context.loaded
        with torch.no_grad():
            importance = [
                sum(float(torch.linalg.vector_norm(p.detach().double(), ord=self.order)) for p in layer.parameters())
                for layer in loaded.adapter.decoder_layers(loaded.model)
            ]
        return MetricResult(name, importance, importance, self.meaning)


METRICS.register("magnitude-l1")(WeightMagnitude(1))
METRICS.register("magnitude-l2")(WeightMagnitude(2))
