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
from layerprune.models.sublayers import has_branch
from layerprune.repair.base import REPAIRS, RepairMethod
from layerprune.repair.folds import scale_norm, scale_projection
from layerprune.repair.statistics import RunStatistics


def scale_branch_output(layer: nn.Module, adapter: ArchitectureAdapter, kind: str, factor: float) -> None:
    """Multiply what ``layer``'s ``kind`` branch (``attention`` or ``mlp``) adds to the residual by ``factor``."""
    post_norm = adapter.post_branch_norm(kind)
    if post_norm is not None:
        scale_norm(layer.get_submodule(post_norm), factor, adapter.norm_kind)
    elif kind == "attention":
        for path in adapter.attention_outputs:
            scale_projection(layer.get_submodule(path), factor)
    else:
        scale_projection(layer.get_submodule(adapter.mlp_output), factor)


def scale_layer_outputs(layer: nn.Module, adapter: ArchitectureAdapter, factor: float) -> None:
    """Multiply everything ``layer`` adds to the residual by ``factor``."""
    for kind in ("attention", "mlp"):
        scale_branch_output(layer, adapter, kind, factor)


def fold_unit_scales(loaded: LoadedModel, runs: list[tuple[int, int]], scales: list[float]) -> None:
    """The fold at the level of branches: units are ``2i`` (layer ``i``'s attention) and ``2i + 1`` (its
    MLP), in the order the residual stream meets them, and ``runs`` are removed runs ``[a, b)`` of units.
    Make the model, once ``runs`` are removed, behave as if the stream were multiplied by ``scales[r]``
    where run ``r`` ends: every kept branch after it is divided by the running product (a branch
    already removed earlier adds nothing and is skipped)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    scale_after = {end: scale for (_, end), scale in zip(runs, scales)}
    removed = {unit for start, end in runs for unit in range(start, end)}
    product = 1.0
    for unit in range(runs[0][1], 2 * len(layers)):
        product *= scale_after.get(unit, 1.0)
        layer, kind = layers[unit // 2], ("attention", "mlp")[unit % 2]
        if unit not in removed and has_branch(layer, loaded.adapter, kind):
            scale_branch_output(layer, loaded.adapter, kind, 1.0 / product)


def fold_stream_scales(loaded: LoadedModel, runs: list[tuple[int, int]], scales: list[float]) -> None:
    """Make the uncut model, once ``runs`` of whole layers are removed, behave as if the stream were
    multiplied by ``scales[r]`` right after run ``r``: the kept layers after it are divided by the running
    product (:func:`fold_unit_scales` with each layer's two units)."""
    fold_unit_scales(loaded, [(2 * start, 2 * end) for start, end in runs], scales)


class Rescale(RepairMethod):
    name = "rescale"
    cost = 1
    branch_cuts = True

    def check(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: None) -> None:
        super().check(loaded, runs, options)
        if loaded.adapter.post_norm:
            raise UsageError("rescale moves its scale across the norms that read the residual stream, but this model "
                             "normalises after each addition (do_layer_norm_before=False, e.g. OPT-350m), so nothing "
                             "reads the stream through a norm; use merge")

    def check_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], options: None) -> None:
        super().check_units(loaded, runs, options)
        if not loaded.adapter.stream_between_branches:
            # checked here, not when the branch statistics refuse it: a search drops the candidate before its cut
            raise UsageError(f"{loaded.adapter.family} layers feed their attention and MLP the same input (parallel "
                             "residual), so a cut of branches has no residual stream between a layer's attention and "
                             "its MLP to collect its statistics at; to rescale, remove whole layers (--layers, not "
                             "--attention and --mlp of the same layer)")

    def apply(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
              options: None) -> tuple[list[dict[str, Any]], str]:
        return self.apply_units(loaded, [(2 * start, 2 * end) for start, end in runs], statistics, options)

    def apply_units(self, loaded: LoadedModel, runs: list[tuple[int, int]], statistics: list[RunStatistics],
                    options: None) -> tuple[list[dict[str, Any]], str]:
        """Units ``2i`` / ``2i + 1``: layer ``i``'s attention / MLP; a whole-layer run ``[a, b)`` is ``[2a, 2b)``.
        At a removed run of branches the stream after it lacks their contributions: ``s`` compares the
        stream leaving the run with the stream entering it, and the kept branches after it are divided by
        ``s`` exactly as after a run of whole layers."""
        scales = [stats.magnitude_ratio() for stats in statistics]
        fold_unit_scales(loaded, runs, scales)
        records = [{"s": scale, "at_end": end == 2 * loaded.num_layers} for (_, end), scale in zip(runs, scales)]
        where = ("the post-attention and post-MLP norm weights" if loaded.adapter.post_mlp_norm is not None
                 else "the attention and MLP output projections")
        note = ("the stream after each removed run was rescaled by s = mean |h_b| / mean |h_a| (Prune&Comp), folded "
                f"into {where} of the later kept branches (embeddings and LM head unchanged)")
        return records, note


REPAIRS.register(Rescale.name)(Rescale())
