"""Writing a model in the DeciLM / Nemotron-NAS layout (:mod:`layerprune.models.decilm`), its removed
branches no-op blocks with no weights, so a runtime saves their compute and their KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerprune.models.decilm import decilm_config, decilm_state
from layerprune.models.export import provenance_json, render_model_card, save_checkpoint
from layerprune.models.lineage import PROVENANCE_FILE, final_record
from layerprune.models.loading import LoadedModel
from layerprune.models.provenance import checked_record


def save_decilm(loaded: LoadedModel, out: str | Path, *, overwrite: bool, protected: list[str | Path],
                max_shard_size: str | int, recipe: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` in the DeciLM layout, ``layerprune.json`` (``format: decilm``) and the model
    card beside it; refused before anything is written where the layout cannot hold the model."""
    config = decilm_config(loaded.model)
    record = checked_record({**final_record(loaded, recipe), "format": "decilm"})
    return save_checkpoint(
        loaded.model, loaded.tokenizer, out, overwrite=overwrite, protected=protected,
        extra_files={"config.json": json.dumps(config, indent=2) + "\n", PROVENANCE_FILE: provenance_json(record),
                     "README.md": render_model_card(record, out)},
        max_shard_size=max_shard_size, state_dict=decilm_state(loaded.model),
    )
