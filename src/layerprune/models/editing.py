"""Cutting and replacing the layers of a loaded model, with its lineage kept right.

The surgery itself (:mod:`layerprune.models.surgery`) knows only modules and configs; these two
operations also record, in original-model indices, what was removed or replaced, so that any later
step (healing, a second cut, export) sees the true history. Below the public API so that healing
methods, which rebuild models, can use them without importing the top level.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from layerprune.models.lineage import ensure_lineage, record_removal, record_replacement
from layerprune.models.loading import LoadedModel
from layerprune.models.surgery import remove_layers, replace_block


def prune(loaded: LoadedModel, layers: Iterable[int], reason: str = "layers named by the user") -> list[int]:
    """Remove ``layers`` (indices of the model as loaded) in place; returns them sorted."""
    kept_before = ensure_lineage(loaded)["kept_layers"]
    removed = remove_layers(loaded.model, layers, loaded.adapter)
    record_removal(loaded, kept_before, removed, reason)
    return removed


def replace(loaded: LoadedModel, start: int, end: int, module: nn.Module, kind: str, note: str = "",
            source_index: int | None = None) -> None:
    """Replace layers ``[start, end)`` by ``module`` in place, recording it in the lineage."""
    kept_before = ensure_lineage(loaded)["kept_layers"]
    replace_block(loaded.model, start, end, module, source_index, loaded.adapter)
    record_replacement(loaded, kept_before, start, end, kind, note)
