"""Provenance: which original layers a (possibly repeatedly) pruned model still holds.

Indices a user passes always refer to the model as loaded. The lineage maps them back to the
original model, so that pruning an already-pruned checkpoint records the right layers. It travels
with every exported checkpoint as ``layerprune.json``; :func:`read_lineage` is the one reader.

This module knows a loaded model only by the few attributes it uses (:class:`WithLineage`), so the
loader can import it to read a checkpoint's lineage without an import cycle.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from layerprune.models.provenance import checked_record, read_record

PROVENANCE_FILE = "layerprune.json"


class WithLineage(Protocol):
    """A model and its lineage (a :class:`~layerprune.models.loading.LoadedModel`)."""

    model: Any
    source: str
    lineage: dict[str, Any]

    @property
    def num_layers(self) -> int: ...


def read_lineage(folder: Path | None) -> dict[str, Any]:
    """The lineage recorded in checkpoint ``folder``; empty for a folder layerprune never wrote
    (an original model) or no folder at all (a hub id)."""
    if folder is None or not (folder / PROVENANCE_FILE).is_file():
        return {}
    return read_record(folder / PROVENANCE_FILE)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {name: _package_version(name) for name in ("layerprune", "torch", "transformers", "accelerate", "peft")} | {
        "python": platform.python_version()
    }


def ensure_lineage(loaded: WithLineage) -> dict[str, Any]:
    """Initialise the lineage of a freshly loaded, never-pruned model."""
    lineage = loaded.lineage
    if "kept_layers" not in lineage:
        lineage.update(new_lineage(loaded.source, loaded.num_layers, count_parameters(loaded.model)))
    return lineage


def new_lineage(source: str, num_layers: int, parameters: int) -> dict[str, Any]:
    """The lineage of a never-pruned model; shard surgery builds it from the checkpoint's
    headers, without a model object."""
    return dict(
        source_model=source,
        original_num_layers=num_layers,
        original_parameters=parameters,
        kept_layers=list(range(num_layers)),
        removed_layers=[],
        replaced_blocks=[],
        healing=[],
    )


def record_removal(loaded: WithLineage, kept_before: list[int], removed_now: list[int], reason: str) -> None:
    apply_removal(ensure_lineage(loaded), kept_before, removed_now, reason)


def apply_removal(lineage: dict[str, Any], kept_before: list[int], removed_now: list[int], reason: str) -> None:
    """Record that the current layers ``removed_now`` are gone, in original-model indices."""
    if lineage.get("branches"):  # a sub-layer cut before: the layers' branches say what each holds
        set_branches(lineage, [b for i, b in enumerate(lineage["branches"]) if i not in set(removed_now)], reason)
        return
    removed_original = [kept_before[i] for i in removed_now]
    lineage["removed_layers"] = sorted(lineage["removed_layers"] + removed_original)
    lineage["kept_layers"] = [idx for i, idx in enumerate(kept_before) if i not in set(removed_now)]
    lineage["reason"] = reason


def layer_branches(lineage: dict[str, Any]) -> list[dict[str, int | None]]:
    """For each current layer, the original layer whose attention and whose MLP it holds (None where
    removed); a model never cut by branch holds both of the layer it descends from."""
    if lineage.get("branches"):
        return [dict(branch) for branch in lineage["branches"]]
    return [{"attention": index, "mlp": index} for index in lineage["kept_layers"]]


def set_branches(lineage: dict[str, Any], branches: list[dict[str, int | None]], reason: str) -> None:
    """Record that the current layers hold ``branches`` (original indices): an original layer with
    neither branch left joins ``removed_layers``, one with one branch left ``removed_attention`` or
    ``removed_mlp``; ``kept_layers`` names each layer by its attention's origin (its MLP's if none)."""
    before = {index for branch in layer_branches(lineage) for index in branch.values() if index is not None}
    attention = {branch["attention"] for branch in branches} - {None}
    mlp = {branch["mlp"] for branch in branches} - {None}
    lineage["removed_layers"] = sorted(set(lineage["removed_layers"]) | (before - attention - mlp))
    lineage["removed_attention"] = sorted(mlp - attention)
    lineage["removed_mlp"] = sorted(attention - mlp)
    lineage["branches"] = branches
    lineage["kept_layers"] = [b["attention"] if b["attention"] is not None else b["mlp"] for b in branches]
    lineage["reason"] = reason


class LineageCut(NamedTuple):
    """A cut in original layer indices: the layers removed whole and those that lost only their attention
    or only their MLP (what :func:`~layerprune.models.editing.prune` takes on the original to make it)."""

    layers: list[int]
    attention: list[int]
    mlp: list[int]

    @property
    def removes_anything(self) -> bool:
        return bool(self.layers or self.attention or self.mlp)


def lineage_cut(lineage: dict[str, Any]) -> LineageCut:
    """What the lineage records removed from the original, so a method that rebuilds from the original
    can cut it again; a layer with neither branch left is among the whole layers (:func:`set_branches`)."""
    return LineageCut(list(lineage.get("removed_layers", [])), list(lineage.get("removed_attention", [])),
                      list(lineage.get("removed_mlp", [])))


def record_replacement(loaded: WithLineage, kept_before: list[int], start: int, end: int, kind: str, note: str) -> None:
    """Record that one module stands in for the current layers ``[start, end)``; like a kept layer, it is
    named by the block's first original layer, and the block's other layers count as removed."""
    lineage = ensure_lineage(loaded)
    block = kept_before[start:end]
    lineage["replaced_blocks"].append({"start": block[0], "end": block[-1] + 1, "kind": kind, "note": note})
    if lineage.get("branches"):  # a sub-layer cut before: the module is one layer with an attention and an MLP
        branches = lineage["branches"]
        module = {"attention": block[0], "mlp": block[0]}
        set_branches(lineage, [*branches[:start], module, *branches[end:]], lineage.get("reason", ""))
        return
    lineage["removed_layers"] = sorted(lineage["removed_layers"] + block[1:])
    lineage["kept_layers"] = [*kept_before[:start], block[0], *kept_before[end:]]


def final_record(loaded: WithLineage, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of exporting ``loaded``; how an earlier export wrote its GGUF file (read back with its
    lineage) is no part of this one, whose writer adds its own."""
    lineage = {key: value for key, value in ensure_lineage(loaded).items() if key != "gguf"}
    return describe_result(lineage, loaded.num_layers, count_parameters(loaded.model),
                           loaded.model.config.model_type, recipe)


def describe_result(lineage: dict[str, Any], num_layers: int, parameters: int, model_type: str,
                    recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``layerprune.json`` record of an exported model with the given lineage, checked against
    :class:`~layerprune.models.provenance.ProvenanceRecord` (so every writer writes the one schema)."""
    record = dict(lineage)
    record.update(
        num_layers=num_layers,
        parameters=parameters,
        model_type=model_type,
        recipe=recipe if recipe is not None else record.get("recipe"),
        versions=versions(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return checked_record(record)
