"""``rescale`` (Prune&Comp, AAAI 2026): give the layers after a cut the stream magnitude they expect.

Removing ``[a, b)`` hands the later layers ``h_a`` where they were trained on ``h_b``, which is
larger: each layer adds to the residual. Prune&Comp multiplies the stream at the cut by
``s = mean_c(mean_t |h_b| / mean_t |h_a|)``.

Where to fold ``s``: scaling the stream itself would mean scaling the embeddings, and with tied
embeddings that changes the LM head. Instead we use that every reader of the residual stream is a
scale-invariant norm (RMSNorm, LayerNorm: ``norm(s x) = norm(x)`` up to its epsilon). Write the
reference stream after the cut as ``z = s y``: layer ``l`` computes ``z + f(norm(z)) =
s (y + f(norm(y)) / s)``. So dividing the output projections of every later layer by ``s`` keeps
``y = z / s`` throughout, the final norm erases the ``1 / s``, and the logits match the reference
while the embeddings and the head stay bit-identical. Gemma adds ``norm(f(...))`` to the
residual, so there the post-sublayer norms' ``(1 + w)`` weights carry the ``1 / s``. Several cuts
compound: a layer after cuts ``r`` is divided by the product of their ``s``. A post-norm model
(OPT-350m) reads its stream without a norm, so the scale cannot move: refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from layerprune.errors import UsageError
from layerprune.models.architectures import ArchitectureAdapter
from layerprune.models.loading import LoadedModel
from layerprune.repair.base import REPAIRS, RepairMethod
from layerprune.repair.folds import scale_norm, scale_projection
from layerprune.repair.statistics import RunStatistics


def scale_layer_outputs(layer: nn.Module, adapter: ArchitectureAdapter, factor: float) -> None:
    """Multiply everything ``layer`` adds to the residual by ``factor``."""
    if adapter.post_attention_norm is not None:
        scale_norm(layer.get_submodule(adapter.post_attention_norm), factor, adapter.norm_kind)
    else:
        for path in adapter.attention_outputs:
            scale_projection(layer.get_submodule(path), factor)
    if adapter.post_mlp_norm is not None:
        scale_norm(layer.get_submodule(adapter.post_mlp_norm), factor, adapter.norm_kind)
    else:
        scale_projection(layer.get_submodule(adapter.mlp_output), factor)


def fold_stream_scales(loaded: LoadedModel, runs: list[tuple[int, int]], scales: list[float]) -> None:
    """Make the uncut model, once ``runs`` are removed, behave as if the stream were multiplied by
    ``scales[r]`` right after run ``r``: the kept layers after it are divided by the running product."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    scale_after = {end: scale for (_, end), scale in zip(runs, scales)}
    removed = {index for start, end in runs for index in range(start, end)}
    product = 1.0
    for index in range(runs[0][1], len(layers)):
        product *= scale_after.get(index, 1.0)
        if index not in removed:
            scale_layer_outputs(layers[index], loaded.adapter, 1.0 / product)


class Rescale(RepairMethod):
    name = "rescale"
    cost = 1

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: None) -> None:
        super().check(loaded, runs, options)
        if loaded.adapter.post_norm:
            raise UsageError("rescale moves its scale across the norms that read the residual stream, but this model "
                             "normalises after each addition (do_layer_norm_before=False, e.g. OPT-350m), so nothing "
                             "reads the stream through a norm; use merge")

    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: None) -> tuple[list[dict[str, Any]], str]:
        scales = [stats.magnitude_ratio() for stats in statistics]
        fold_stream_scales(loaded, runs, scales)
        records = [{"s": scale, "at_end": end == loaded.num_layers} for (_, end), scale in zip(runs, scales)]
        where = ("the post-attention and post-MLP norm weights" if loaded.adapter.post_mlp_norm is not None
                 else "the attention and MLP output projections")
        note = ("the stream after each removed run was rescaled by s = mean |h_b| / mean |h_a| (Prune&Comp), folded "
                f"into {where} of the later layers (embeddings and LM head unchanged)")
        return records, note


REPAIRS.register(Rescale.name)(Rescale())
