"""Cutting and replacing the layers of a loaded model, with its lineage kept right.

The surgery itself (:mod:`layerprune.models.surgery`) knows only modules and configs; these two
operations also record, in original-model indices, what was removed or replaced, so that any later
step (healing, a second cut, export) sees the true history. Below the public API so that healing
methods, which rebuild models, can use them without importing the top level.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from layerprune.errors import UsageError

from layerprune.models.lineage import ensure_lineage, layer_branches, record_removal, record_replacement, set_branches
from layerprune.models.loading import LoadedModel
from layerprune.models.sublayers import ATTENTION, MLP, remove_branches, repack
from layerprune.models.surgery import remove_layers, replace_block


def refuse_sharded(loaded: LoadedModel) -> None:
    """Refuse to edit a model whose whole weights are its gathered ``export_state`` (FSDP healing): the
    edit would change this process's shards while the save writes the uncut weights it gathered."""
    if loaded.export_state is not None:
        raise UsageError("this model was healed under FSDP: its layers hold this process's shards and its "
                         "saved weights were gathered before any further edit; save it (layerprune.save) and "
                         "load the saved model to cut it again")


def prune(loaded: LoadedModel, layers: Iterable[int] = (), reason: str = "layers named by the user", *,
          attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> list[int]:
    """Remove whole ``layers``, and the attention of the layers ``attention`` and the MLP of the layers
    ``mlp`` (indices of the model as loaded), in place; returns the layers that went whole, sorted (a
    layer left with neither branch goes whole)."""
    attention, mlp = list(attention), list(mlp)
    refuse_sharded(loaded)
    lineage = ensure_lineage(loaded)
    if not attention and not mlp:
        kept_before = lineage["kept_layers"]
        removed = remove_layers(loaded.model, layers, loaded.adapter)
        record_removal(loaded, kept_before, removed, reason)
        return removed
    if lineage["replaced_blocks"]:
        raise UsageError("this model holds replaced blocks, whose branches are not an attention and an MLP; "
                         "remove whole layers from it")
    branches = layer_branches(lineage)
    whole = remove_branches(loaded.model, loaded.adapter, list(layers), attention, mlp)
    for kind, named in ((ATTENTION, attention), (MLP, mlp)):
        for index in named:
            branches[index][kind] = None
    set_branches(lineage, [branch for i, branch in enumerate(branches) if i not in whole], reason)
    return whole


def export_form(loaded: LoadedModel) -> tuple[LoadedModel, int]:
    """``loaded`` as standard layers a plain transformers checkpoint holds, and the number of zero
    partners that took: a model with a removed branch is repacked on a copy that shares the weights
    (:func:`~layerprune.models.sublayers.repack`), any other is itself."""
    branches = loaded.lineage.get("branches")
    if not branches or all(None not in branch.values() for branch in branches):
        return loaded, 0
    packed = loaded.copy(share_weights=True)
    origins, zeros = repack(packed.model, packed.adapter, branches)
    set_branches(packed.lineage, origins, packed.lineage.get("reason", ""))
    packed.lineage["zero_partners"] = zeros
    return packed, zeros


def replace(loaded: LoadedModel, start: int, end: int, module: nn.Module, kind: str, note: str = "",
            source_index: int | None = None) -> None:
    """Replace layers ``[start, end)`` by ``module`` in place, recording it in the lineage."""
    refuse_sharded(loaded)
    kept_before = ensure_lineage(loaded)["kept_layers"]
    replace_block(loaded.model, start, end, module, source_index, loaded.adapter)
    record_replacement(loaded, kept_before, start, end, kind, note)
