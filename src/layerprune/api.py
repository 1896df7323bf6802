"""The public Python API: one function per pipeline step, each a thin layer over the modules.

    import layerprune as lp
    loaded = lp.load_model("smollm2-135m")
    lp.prune(loaded, [24, 25, 26, 27])
    lp.save(loaded, "out/smollm2-26l")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerprune.models.decilm_export import save_decilm
from layerprune.models.editing import export_form
from layerprune.models.editing import prune, replace  # noqa: F401  (the public API re-exports them)
from layerprune.models.export import DEFAULT_EXPORT, ExportConfig, provenance_json, render_model_card, save_checkpoint
from layerprune.models.gguf_export import save_gguf
from layerprune.models.lineage import PROVENANCE_FILE, count_parameters, final_record
from layerprune.models.loading import LoadedModel


def save(loaded: LoadedModel, out: str | Path, *, overwrite: bool = DEFAULT_EXPORT.overwrite,
         recipe: dict[str, Any] | None = None, max_shard_size: str | int = DEFAULT_EXPORT.max_shard_size,
         format: str = DEFAULT_EXPORT.format, gguf_type: str | None = DEFAULT_EXPORT.gguf_type) -> Path:
    """Export a checkpoint with ``layerprune.json`` and a model card beside it into the folder ``out``
    (refused if it exists, unless ``overwrite``). ``format`` is the checkpoint format (``transformers``:
    safetensors weights that plain transformers loads; ``gguf``: one ``model.gguf`` for llama.cpp, its
    tensors quantized to ``gguf_type`` where they are not the source file's own; llama.cpp's ``deci`` after a
    sub-layer cut; ``decilm``: DeciLMForCausalLM with ``block_configs``, for Llama-architecture models, its
    removed branches no-op blocks without weights), ``max_shard_size``
    the largest weight file (``"2GB"``, ``"500MB"`` or bytes): the options of
    :class:`~layerprune.models.export.ExportConfig`, checked before anything is written."""
    config = ExportConfig(out=out, overwrite=overwrite, max_shard_size=max_shard_size, format=format,
                          gguf_type=gguf_type)
    protected = [loaded.local_dir] if loaded.local_dir is not None else []
    if config.format == "decilm":
        return save_decilm(loaded, out, overwrite=config.overwrite, protected=protected,
                           max_shard_size=config.max_shard_size, recipe=recipe)
    if config.format == "gguf":
        return save_gguf(loaded, out, overwrite=config.overwrite, protected=protected, gguf_type=config.gguf_type,
                         recipe=recipe)
    written, _ = export_form(loaded)  # removed branches: repacked into standard layers (with zero partners)
    record = final_record(written, recipe)
    return save_checkpoint(
        written.model, loaded.tokenizer, out, overwrite=config.overwrite, protected=protected,
        extra_files={PROVENANCE_FILE: provenance_json(record), "README.md": render_model_card(record, out)},
        max_shard_size=config.max_shard_size, state_dict=loaded.export_state,
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
