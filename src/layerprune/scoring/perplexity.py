"""``ppl``: the perplexity of the model with layer ``i`` removed, for every ``i``.

Removing layer ``i`` leaves layers ``0..i-1`` untouched, so their output (the input of layer ``i``)
is the same for the full model and for every candidate from ``i`` on. One recorded pass per batch
caches each layer's input together with the exact extra arguments it received (masks, rotary
embeddings, per-layer-type variants for Gemma-3); candidate ``i`` then restarts from the cached
input of layer ``i``, skips it, and runs only layers ``i+1..L-1`` and the head. That is about half
the layer evaluations of L separate pruned forward passes and gives the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext
from layerprune.scoring.forward import (
    check_finite, lm_batches, loss_setup, replay_layer, run_decoder, watching_layers,
)

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]


class LayerRemovalPerplexity(Metric):
    meaning = "perplexity of the model with this layer removed; higher = removing it hurts more = more important"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        loaded = context.loaded
        calibration, total, layers, head = loss_setup(loaded, context.data(name), name)
        removed_nll = torch.zeros(len(layers), dtype=torch.float64)
        full_nll = 0.0
        for input_ids, attention_mask, where, targets in lm_batches(calibration, context.batch_size, name):
            inputs: list[torch.Tensor] = []
            calls: list[LayerCall] = []

            def record(index: int, x_in: torch.Tensor, x_out: torch.Tensor, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
                check_finite(index, x_out, attention_mask)
                inputs.append(x_in)
                calls.append((args[1:], kwargs))

            with torch.inference_mode():
                with watching_layers(layers, record):
                    final = run_decoder(loaded, input_ids, attention_mask)
                full_nll += float(head.nll_sum(final, where, targets, normed=True))
                for skipped in range(len(layers)):
                    hidden = inputs[skipped]
                    for index in range(skipped + 1, len(layers)):
                        hidden = replay_layer(layers[index], hidden, *calls[index])
                    removed_nll[skipped] += float(head.nll_sum(hidden, where, targets))
        perplexities = [math.exp(float(nll) / total) for nll in removed_nll]
        return MetricResult(name, perplexities, perplexities, self.meaning,
                            details={"full_model": math.exp(full_nll / total), "targets": total})


METRICS.register("ppl")(LayerRemovalPerplexity())
