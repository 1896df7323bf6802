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
from dataclasses import replace

import torch
from torch import nn

from layerprune.errors import OptionError
from layerprune.models.sublayers import branch_units, check_sublayers, unit_name
from layerprune.scoring.base import METRICS, LayerPass, Metric, MetricResult, ScoringContext, Stream
from layerprune.scoring.forward import lm_batches, loss_setup, next_token_targets, record_pass, replay_from


class LayerRemovalPerplexity(Metric):
    streaming_refusal = None
    costly = True
    meaning = "perplexity of the model with this layer removed; higher = removing it hurts more = more important"

    def forward_passes(self, units: int, head_ratio: float = 0.0) -> float:
        """Each removal runs the units after it (about half the decoder, the prefix reused) and the LM
        head, which on a small model with a large vocabulary costs more than the decoder (Gemma-3-270M's
        262k-token head: about 1.7 decoder passes)."""
        return units * (0.5 + head_ratio)

    sublayer_refusal = None
    branch_meaning = ("perplexity of the model with this branch removed; higher = removing it hurts more = more "
                      "important")

    def compute(self, context: ScoringContext, name: str) -> MetricResult:
        return context.cached(f"result:{name}", lambda: self._in_memory(context, name))

    def compute_branches(self, context: ScoringContext, name: str) -> MetricResult:
        """Each branch removed in turn (its output zeroed, :func:`branch_zeroed`), from its layer's cached
        input as for layers: parallel-residual families included, since nothing sits between branches."""
        loaded = context.loaded
        check_sublayers(loaded.adapter)
        units = branch_units(loaded.model, loaded.adapter)
        result = self._in_memory(context, name, units)
        return replace(result, meaning=self.branch_meaning, units=[unit_name(*unit) for unit in units])

    def layer_pass(self, context: ScoringContext, name: str) -> LayerPass:
        return RemovalStream(self, context, name)

    def _in_memory(self, context: ScoringContext, name: str,
                   branches: list[tuple[str, int]] | None = None) -> MetricResult:
        """Removal perplexities of every layer, or of every branch of ``branches`` (``(kind, layer)``)."""
        loaded = context.loaded
        calibration, total, layers, head = loss_setup(loaded, context.data(name), name)
        candidates = branches if branches is not None else [(None, index) for index in range(len(layers))]
        removed_nll = torch.zeros(len(candidates), dtype=torch.float64)
        full_nll = 0.0
        for input_ids, attention_mask, where, targets in lm_batches(calibration, context.batch_size, name):
            with torch.inference_mode():
                recorded = record_pass(loaded, layers, input_ids, attention_mask)
                full_nll += float(head.nll_sum(recorded.final, where, targets, normed=True))
                for position, (kind, skipped) in enumerate(candidates):
                    if kind is None:
                        hidden = replay_from(layers, recorded, skipped, frozenset({skipped}))
                    else:  # the branch's layer runs with the branch adding nothing
                        hidden = replay_from(layers, recorded, skipped, zeroed={skipped: kind}, adapter=loaded.adapter)
                    removed_nll[position] += float(head.nll_sum(hidden, where, targets))
        perplexities = [math.exp(float(nll) / total) for nll in removed_nll]
        return MetricResult(name, perplexities, perplexities, self.meaning,
                            details={"full_model": math.exp(full_nll / total), "targets": total})


class RemovalStream(LayerPass):
    """``ppl`` under layer streaming: one partial stream per skipped layer. When layer ``j`` is
    loaded, every stream that skipped an earlier layer goes through it, and the stream that skips
    ``j`` starts from ``j``'s input; at the end each stream (and the full model) meets the head."""

    def __init__(self, metric: LayerRemovalPerplexity, context: ScoringContext, name: str) -> None:
        rows = context.data(name)
        if not bool(next_token_targets(rows.input_ids, rows.attention_mask)[0].any()):
            raise OptionError.about("seq_len", "leaves ppl rows without two real tokens; raise it or use other data")
        self.metric, self.context, self.name = metric, context, name
        self.count = context.loaded.num_layers

    def on_batch(self, index: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, layer: nn.Module,
                 stream: Stream) -> None:
        for skipped in range(index):
            key = ("h", skipped, batch)
            stream.store.put(key, stream.replay(layer, index, batch, stream.store.get(key)))
        stream.store.put(("h", index, batch), x_in)

    def finish(self, stream: Stream) -> None:
        removed = torch.zeros(self.count, dtype=torch.float64)
        full = torch.zeros(1, dtype=torch.float64)
        targets = torch.tensor([sum(int(b.where.sum()) for b in stream.batches)], dtype=torch.float64)
        with stream.head() as head, torch.no_grad():
            for b, batch in enumerate(stream.batches):
                if not bool(batch.where.any()):
                    continue
                full += float(head.nll_sum(stream.hidden(b), batch.where, batch.targets))
                for skipped in range(self.count):
                    removed[skipped] += float(head.nll_sum(stream.store.get(("h", skipped, b)), batch.where,
                                                           batch.targets))
        stream.all_reduce(removed, full, targets)
        total = float(targets)
        perplexities = [math.exp(float(nll) / total) for nll in removed]
        result = MetricResult(self.name, perplexities, perplexities, self.metric.meaning,
                              details={"full_model": math.exp(float(full) / total), "targets": int(total)})
        self.context.cached(f"result:{self.name}", lambda: result)


METRICS.register("ppl")(LayerRemovalPerplexity())
