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

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from layerprune.errors import UsageError
from layerprune.models.sublayers import ATTENTION, branch_units, check_sublayers, unit_name
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


def branch_similarity_pass(context: ScoringContext, positions: str) -> tuple[SimilarityAccumulator, list[str]]:
    """The similarity sums with each attention and MLP branch as a unit, from one forward pass.

    A branch of a sequential layer turns the residual stream from one state into the next: the
    attention from the layer's input to the input of its pre-MLP norm (hooked), the MLP from there
    to the layer's output (a removed branch changes nothing, so the states chain). Entry ``[k, j]``
    compares the state before unit ``k`` with the state after unit ``j``, so ``bi`` is per branch
    (for attention, LLM-Drop's attention-drop similarity) and ``angular`` has blocks of adjacent
    branches. A parallel-residual layer feeds both branches the same input: there is no state
    between them, so it is refused."""
    loaded = context.loaded
    adapter = loaded.adapter
    check_sublayers(adapter)
    if not adapter.stream_between_branches:
        raise UsageError(f"the {adapter.family} layers' attention and MLP read the same input (parallel residual), so "
                         "no residual state lies between them to compare; score their branches with ppl")
    units = branch_units(loaded.model, adapter)
    layers = adapter.decoder_layers(loaded.model)
    accumulator = SimilarityAccumulator(len(units))
    for batch in context.data("bi/angular/block-cosine").batches(context.batch_size, "similarity pass"):
        keep = scored_positions(batch["attention_mask"], positions).to(loaded.model.device)
        states: dict[tuple[str, int], torch.Tensor] = {}

        def on_layer(index: int, x_in: torch.Tensor, x_out: torch.Tensor, *_: Any) -> None:
            check_finite(index, x_out, batch["attention_mask"])
            states["in", index], states["out", index] = unit_rows(x_in[keep]), unit_rows(x_out[keep])

        def middle(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                # OPT flattens the tokens before its pre-MLP norm: back to [rows, seq, hidden]
                states["mid", index] = unit_rows(args[0].reshape(*keep.shape, -1)[keep])
            return hook

        handles = [layer.get_submodule(adapter.pre_mlp_norm).register_forward_pre_hook(middle(i))
                   for i, layer in enumerate(layers)]
        try:
            with torch.no_grad(), watching_layers(layers, on_layer):
                run_decoder(loaded, batch["input_ids"], batch["attention_mask"])
        finally:
            for handle in handles:
                handle.remove()
        has = set(units)
        chain = [states["in", units[0][1]]]  # the state before each unit, then after the last
        for kind, index in units:
            chain.append(states["mid", index] if kind == ATTENTION and ("mlp", index) in has else states["out", index])
        before = torch.stack(chain[:-1])
        for end in range(len(units)):
            cosines = torch.einsum("knh,nh->kn", before[:end + 1], chain[end + 1])
            accumulator.add_cosines(range(end + 1), end, cosines)
    return accumulator, [unit_name(kind, index) for kind, index in units]


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

    sublayer_refusal = None

    def compute_branches(self, context: ScoringContext, name: str) -> MetricResult:
        """The layer result's code on the branch units' sums (:func:`branch_similarity_pass`)."""
        positions = context.options_of(self).positions
        accumulator, units = context.cached("branch-similarity", lambda: branch_similarity_pass(context, positions))
        return replace(self.from_sums(accumulator, name), units=units)

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        return self.from_sums(self.accumulated(context), name)

    def from_sums(self, accumulator: SimilarityAccumulator, name: str) -> MetricResult:
        raise NotImplementedError


class BlockInfluence(_Similarity):
    pairs = False
    meaning = "BI = 1 - mean cos(layer input, layer output); higher = the layer changes more = more important"

    def from_sums(self, accumulator: SimilarityAccumulator, name: str) -> MetricResult:
        influence = accumulator.block_influence()
        return MetricResult(name, influence, influence, self.meaning)


class AngularDistance(_Similarity):
    meaning = ("angular distance {n: [d(start, n)]} = mean arccos(cos(input of start, output of start+n-1))/pi; "
               "lower = the block changes less = better to remove")

    def from_sums(self, accumulator: SimilarityAccumulator, name: str) -> MetricResult:
        table = accumulator.angular_distance()
        return MetricResult(name, table[1], table, self.meaning, blocks=table)


class BlockCosine(_Similarity):
    meaning = ("block cosine {n: [mean cos(input of start, output of start+n-1)]}; "
               "higher = the block changes less = better to remove")

    def from_sums(self, accumulator: SimilarityAccumulator, name: str) -> MetricResult:
        table = accumulator.mean_cosine()
        dissimilarity = {n: [1.0 - c for c in row] for n, row in table.items()}
        return MetricResult(name, dissimilarity[1], table, self.meaning, blocks=dissimilarity)


METRICS.register("bi")(BlockInfluence())
METRICS.register("angular")(AngularDistance())
METRICS.register("block-cosine")(BlockCosine())
