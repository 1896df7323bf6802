"""``magnitude-l1`` / ``magnitude-l2``: how large a layer's weights are.

As in Reassessing Layer Pruning, a layer's importance is the sum, over every weight tensor of the
layer, of that tensor's entrywise L1 (or L2) norm. It needs no data; norms are taken in float64 so
bfloat16 weights give the same ranking as their float32 originals.
"""

from __future__ import annotations

import torch
from torch import nn

from layerprune.scoring.base import METRICS, LayerPass, Metric, MetricResult, ScoringContext, Stream


class WeightMagnitude(Metric):
    needs_data = False
    streaming_refusal = None

    def __init__(self, order: int) -> None:
        self.order = order
        self.meaning = f"sum over the layer's weight tensors of their L{order} norm; higher = more important"

    def layer_value(self, layer: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(torch.linalg.vector_norm(p.detach().double(), ord=self.order)) for p in layer.parameters())

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        loaded = context.loaded
        importance = context.cached(f"weights:{name}", lambda: [
            self.layer_value(layer) for layer in loaded.adapter.decoder_layers(loaded.model)])
        return MetricResult(name, importance, importance, self.meaning)

    def layer_pass(self, context: ScoringContext, name: str) -> LayerPass:
        return MagnitudeStream(self, context, f"weights:{name}")


class MagnitudeStream(LayerPass):
    """Each layer's norm is taken while streaming has it loaded; no activations needed."""

    needs_activations = False

    def __init__(self, metric: WeightMagnitude, context: ScoringContext, key: str) -> None:
        self.metric, self.context, self.key = metric, context, key
        self.values = [0.0] * context.loaded.num_layers

    def on_layer(self, index: int, layer: nn.Module) -> None:
        self.values[index] = self.metric.layer_value(layer)

    def finish(self, stream: Stream) -> None:
        self.context.cached(self.key, lambda: self.values)


METRICS.register("magnitude-l1")(WeightMagnitude(1))
METRICS.register("magnitude-l2")(WeightMagnitude(2))
