"""``taylor``: first-order Taylor estimate of the loss change from zeroing a layer's weights.

For layer ``i`` the importance is ``|sum over its weights w of w * dL/dw|`` with ``L`` the mean
next-token loss over all real calibration tokens (Reassessing Layer Pruning, Shortened LLaMA).
Because the sum is linear in the gradient, each batch's share is folded into float64 sums right
after its backward pass and the gradients are dropped, so half-precision gradients never
accumulate across batches and the model is left without ``.grad`` tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext
from layerprune.scoring.forward import check_finite, lm_batches, loss_setup, run_decoder, watching_layers


@contextmanager
def gradients_for(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Compute gradients for ``trainable`` only (saves memory), restoring every flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
            parameter.grad = None


class TaylorImportance(Metric):
    streaming_refusal = "taylor needs gradients through the whole model"
    costly = True
    meaning = "|sum over the layer's weights of w * dLoss/dw| on the calibration LM loss; higher = more important"

    def forward_passes(self, units: int, head_ratio: float = 0.0) -> float:
        """A forward pass through the decoder and the LM head, and a backward one, which costs about two."""
        return 3.0 * (1 + head_ratio)

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        loaded = context.loaded
        calibration, total, layers, head = loss_setup(loaded, context.data(name), name)
        weights = [list(layer.parameters()) for layer in layers]
        sums = torch.zeros(len(layers), dtype=torch.float64)
        with gradients_for(loaded.model, [p for group in weights for p in group]):
            for input_ids, attention_mask, where, targets in lm_batches(calibration, context.batch_size, name):
                def check(index: int, _x_in: torch.Tensor, x_out: torch.Tensor, *_: Any) -> None:
                    check_finite(index, x_out, attention_mask)

                with torch.enable_grad(), watching_layers(layers, check):
                    hidden = run_decoder(loaded, input_ids, attention_mask)
                    (head.nll_sum(hidden, where, targets, normed=True) / total).backward()
                with torch.no_grad():
                    for index, group in enumerate(weights):
                        sums[index] += sum(float((p.double() * p.grad.double()).sum()) for p in group
                                           if p.grad is not None)
                        for parameter in group:
                            parameter.grad = None
        importance = sums.abs().tolist()
        return MetricResult(name, importance, importance, self.meaning)


METRICS.register("taylor")(TaylorImportance())
