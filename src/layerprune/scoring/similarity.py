"""``bi``, ``angular`` and ``block-cosine``: how much a layer (or a run of layers) turns its input.

All three come from one forward pass over the calibration data. Forward hooks see the true input
and output of every decoder layer (so the last layer is scored against its own output, not the
final-normed state that ``output_hidden_states[-1]`` is in transformers 5). Within a batch the
unit-length inputs of the layers seen so far are held (at most L of them, bounded by the batch,
never by the total number of tokens); when layer ``j`` finishes, its output is compared with the
input of every layer ``i <= j`` at once, and only the per-pair sums go into a
:class:`~layerprune.scoring.accumulators.SimilarityAccumulator`. Padding never counts.
"""

from __future__ import annotations

from typing import Any

import torch

from layerprune.scoring.accumulators import SimilarityAccumulator, unit_rows
from layerprune.scoring.base import METRICS, Metric, MetricResult, ScoringContext
from layerprune.scoring.forward import check_finite, run_decoder, scored_positions, watching_layers


def similarity_pass(context: ScoringContext) -> SimilarityAccumulator:
    """One forward pass over the calibration data, accumulating cos(x_in_i, x_out_j) for all i <= j."""
    loaded = context.loaded
    layers = loaded.adapter.decoder_layers(loaded.model)
    accumulator = SimilarityAccumulator(len(layers))
    calibration = context.data("bi/angular/block-cosine")
    device = loaded.model.device
    for batch in calibration.batches(context.batch_size, "similarity pass"):
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        keep = scored_positions(attention_mask, context.positions).to(device)
        seen: list[torch.Tensor] = []  # one [L, tokens, hidden] buffer of unit inputs, this batch only

        def on_layer(index: int, x_in: torch.Tensor, x_out: torch.Tensor, *_: Any) -> None:
            check_finite(index, x_out, attention_mask)
            unit_in = unit_rows(x_in[keep])
            if index == 0:
                seen[:] = [unit_in.new_empty((len(layers), *unit_in.shape))]
            elif not seen:
                raise RuntimeError(f"decoder layer {index} ran before layer 0")
            seen[0][index] = unit_in
            cosines = torch.einsum("knh,nh->kn", seen[0][:index + 1], unit_rows(x_out[keep]))
            accumulator.add_cosines(range(index + 1), index, cosines)

        with torch.no_grad(), watching_layers(layers, on_layer):
            run_decoder(loaded, input_ids, attention_mask)
    return accumulator


def _accumulated(context: ScoringContext) -> SimilarityAccumulator:
    return context.cached("similarity", lambda: similarity_pass(context))


class BlockInfluence(Metric):
    meaning = "BI = 1 - mean cos(layer input, layer output); higher = the layer changes more = more important"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        influence = _accumulated(context).block_influence()
        return MetricResult(name, influence, influence, self.meaning)


class AngularDistance(Metric):
    meaning = ("angular distance {n: [d(start, n)]} = mean arccos(cos(input of start, output of start+n-1))/pi; "
               "lower = the block changes less = better to remove")

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        table = _accumulated(context).angular_distance()
        return MetricResult(name, table[1], table, self.meaning, blocks=table)


class BlockCosine(Metric):
    meaning = ("block cosine {n: [mean cos(input of start, output of start+n-1)]}; "
               "higher = the block changes less = better to remove")

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        table = _accumulated(context).mean_cosine()
        dissimilarity = {n: [1.0 - c for c in row] for n, row in table.items()}
        return MetricResult(name, dissimilarity[1], table, self.meaning, blocks=dissimilarity)


METRICS.register("bi")(BlockInfluence())
METRICS.register("angular")(AngularDistance())
METRICS.register("block-cosine")(BlockCosine())
