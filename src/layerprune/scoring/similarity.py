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
from torch import nn

from layerprune.options import Config, option
from layerprune.scoring.accumulators import SimilarityAccumulator, unit_rows
from layerprune.scoring.base import METRICS, LayerPass, Metric, MetricResult, ScoringContext, Stream
from layerprune.scoring.forward import POSITIONS, check_finite, run_decoder, scored_positions, watching_layers


class SimilarityOptions(Config):
    unit = "similarity"

    positions: str = option("all", "average over all real tokens, or only each row's last token (Gromov et al.)",
                            choices=POSITIONS)


def similarity_pass(context: ScoringContext, positions: str) -> SimilarityAccumulator:
    """One forward pass over the calibration data, accumulating cos(x_in_i, x_out_j) for all i <= j."""
    loaded = context.loaded
    layers = loaded.adapter.decoder_layers(loaded.model)
    accumulator = SimilarityAccumulator(len(layers))
    calibration = context.data("bi/angular/block-cosine")
    device = loaded.model.device
    for batch in calibration.batches(context.batch_size, "similarity pass"):
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        keep = scored_positions(attention_mask, positions).to(device)
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


class SimilarityStream(LayerPass):
    """The similarity sums under layer streaming: cos(input of ``i``, output of ``j``) for ``i == j``
    only, or for every ``i <= j`` once a block metric asks for ``pairs`` (the unit inputs of earlier
    layers then wait in the stream's store)."""

    def __init__(self, context: ScoringContext, layers: int, positions: str) -> None:
        self.context = context
        self.positions = positions
        self.accumulator = SimilarityAccumulator(layers)
        self.pairs = False

    def on_batch(self, index: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, layer: nn.Module,
                 stream: Stream) -> None:
        keep = scored_positions(stream.batches[batch].attention_mask, self.positions)
        unit_in, unit_out = unit_rows(x_in[keep]), unit_rows(x_out[keep])
        if not self.pairs:
            self.accumulator.add_cosines([index], index, (unit_in * unit_out).sum(dim=-1)[None])
            return
        stream.store.put(("u", index, batch), unit_in)
        for i in range(index + 1):
            self.accumulator.add_cosines([i], index, (stream.store.get(("u", i, batch)) * unit_out).sum(dim=-1)[None])

    def finish(self, stream: Stream) -> None:
        accumulator = self.accumulator
        stream.all_reduce(accumulator.cos_sum, accumulator.angle_sum, accumulator.count)
        self.context.cached("similarity", lambda: accumulator)


class _Similarity(Metric):
    """The three metrics of the one similarity pass; ``pairs``: whether it needs every block, not
    only single layers."""

    options_class = SimilarityOptions
    pairs = True
    streaming_refusal = None
    shared_pass = "similarity"

    def accumulated(self, context: ScoringContext) -> SimilarityAccumulator:
        positions = context.options_of(self).positions
        return context.cached("similarity", lambda: similarity_pass(context, positions))

    def layer_pass(self, context: ScoringContext, name: str) -> LayerPass:
        shared = context.cached("similarity-stream", lambda: SimilarityStream(
            context, context.loaded.num_layers, context.options_of(self).positions))
        shared.pairs = shared.pairs or self.pairs
        return shared


class BlockInfluence(_Similarity):
    pairs = False
    meaning = "BI = 1 - mean cos(layer input, layer output); higher = the layer changes more = more important"

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        influence = self.accumulated(context).block_influence()
        return MetricResult(name, influence, influence, self.meaning)


class AngularDistance(_Similarity):
    meaning = ("angular distance {n: [d(start, n)]} = mean arccos(cos(input of start, output of start+n-1))/pi; "
               "lower = the block changes less = better to remove")

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        table = self.accumulated(context).angular_distance()
        return MetricResult(name, table[1], table, self.meaning, blocks=table)


class BlockCosine(_Similarity):
    meaning = ("block cosine {n: [mean cos(input of start, output of start+n-1)]}; "
               "higher = the block changes less = better to remove")

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        table = self.accumulated(context).mean_cosine()
        dissimilarity = {n: [1.0 - c for c in row] for n, row in table.items()}
        return MetricResult(name, dissimilarity[1], table, self.meaning, blocks=dissimilarity)


METRICS.register("bi")(BlockInfluence())
METRICS.register("angular")(AngularDistance())
METRICS.register("block-cosine")(BlockCosine())
