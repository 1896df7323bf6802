"""The public Python API: one function per pipeline step, each a thin layer over the modules.

    import layerprune as lp
    loaded = lp.load_model("smollm2-135m")
    lp.prune(loaded, [24, 25, 26, 27])
    lp.save(loaded, "out/smollm2-26l")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from layerprune.models.export import provenance_json, save_checkpoint
from layerprune.models.lineage import count_parameters, ensure_lineage, final_record, record_removal, record_replacement
from layerprune.models.loading import PROVENANCE_FILE, LoadedModel
from layerprune.models.surgery import remove_layers, replace_block
from layerprune.reporting.model_card import render_model_card


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


def save(loaded: LoadedModel, out: str | Path, *, overwrite: bool = False, recipe: dict[str, Any] | None = None,
         max_shard_size: str | int = "2GB") -> Path:
    """Export a standard checkpoint with ``layerprune.json`` and a model card beside it."""
    record = final_record(loaded, recipe)
    protected = [loaded.local_dir] if loaded.local_dir is not None else []
    return save_checkpoint(
        loaded.model, loaded.tokenizer, out, overwrite=overwrite, protected=protected,
        extra_files={PROVENANCE_FILE: provenance_json(record), "README.md": render_model_card(record)},
        max_shard_size=max_shard_size,
    )


def info(loaded: LoadedModel) -> dict[str, Any]:
    """Family, layer count and parameter count of a loaded model."""
    config = loaded.model.config
    return {
        "model": loaded.source,
        "family": loaded.adapter.family,
        "model_type": config.model_type,
        "class": type(loaded.model).__name__,
        "num_layers": loaded.num_layers,
        "parameters": count_parameters(loaded.model),
        "hidden_size": getattr(config, "hidden_size", None),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "layer_types": getattr(config, "layer_types", None),
        "removed_layers": loaded.lineage.get("removed_layers", []),
    }
