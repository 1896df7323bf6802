"""``layerprune.json``: the typed, versioned record every exported checkpoint carries.

The lineage a model gathers while it is pruned, repaired and healed is checked against
:class:`ProvenanceRecord` before it is written, so the file always has the same shape and a
``format_version``; its JSON Schema ships in the package (``layerprune/schemas/``, written by
``docs/gen_api.py``) for readers that do not import layerprune. A record older than
``format_version`` (written before the field existed) reads as version 1: its shape was the same.
Version 2 added the sub-layer fields (``removed_attention``, ``removed_mlp``, ``branches``,
``zero_partners``, ``format``), each with a default, so a version-1 record reads as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from layerprune.records import checked, known_record, read_checked

FORMAT_VERSION = 2


class _Record(BaseModel):
    """A part of the record: typed where layerprune relies on the key, open to keys it adds later."""

    model_config = ConfigDict(extra="allow")


class ReplacedBlock(_Record):
    """Original layers ``[start, end)`` replaced by one trained module."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    kind: str
    note: str = ""


class LayerBranches(_Record):
    """The original layers whose attention and whose MLP one layer holds (null: that branch was removed;
    in an exported ``transformers`` checkpoint it is a zero partner, a branch whose weights are zero)."""

    attention: int | None = Field(ge=0)
    mlp: int | None = Field(ge=0)


class HealingEntry(_Record):
    """One healing (or training-free repair as a healing step), in the order they ran."""

    method: str
    summary: str
    data: dict[str, Any] = Field(description="what it trained or calibrated on (source, split, sizes)")
    trainable_parameters: int = Field(ge=0)
    train_seconds: float = Field(ge=0)
    config: dict[str, Any] | None = Field(
        default=None, description="the healing's HealConfig: method, data, original, the training options and the "
        "method's own (absent for a training-free repair recorded by prune)")


class RepairEntry(_Record):
    """One training-free repair: its config (the method, the statistics pass's batch, the method's
    options as run), its calibration and each repaired run."""

    method: str
    batch_size: int | None = Field(default=None, ge=1, description="rows per forward pass of the statistics pass "
                                   "(not recorded before it was)")
    options: dict[str, Any]
    data: dict[str, Any]
    runs: list[dict[str, Any]]
    summary: str
    seconds: float = Field(ge=0)
    statistics_seconds: float = Field(default=0.0, ge=0)


class GgufTensor(_Record):
    """How one tensor of a GGUF export was written."""

    type: str = Field(description="its GGUF type (Q4_1, Q8_0, F32, ...)")
    written: str = Field(description="copied (the source file's bytes, unchanged) or quantized (from the model's "
                         "values, by the gguf package)")


class GgufExport(_Record):
    """A ``--format gguf`` export: the file, its llama.cpp architecture, the GGUF file it came from (if
    any), and each tensor's type and how it was written."""

    file: str
    architecture: str
    source_file: str | None = None
    tensors: dict[str, GgufTensor]


@known_record
class ProvenanceRecord(BaseModel):
    """What ``layerprune.json`` holds: the source, the removed layers in the original numbering, every
    replacement, repair and healing, and the versions and date of the export."""

    model_config = ConfigDict(extra="forbid", title="layerprune.json")

    format_version: int = Field(default=FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    source_model: str
    original_num_layers: int = Field(ge=1)
    original_parameters: int = Field(ge=0)
    kept_layers: list[int] = Field(description="original indices of the layers the model holds, in order")
    removed_layers: list[int] = Field(description="original indices of the removed layers, sorted")
    removed_attention: list[int] = Field(default=[], description="original indices of the layers whose attention "
                                         "alone was removed (their MLP kept), sorted (format_version 2)")
    removed_mlp: list[int] = Field(default=[], description="original indices of the layers whose MLP alone was "
                                   "removed (their attention kept), sorted (format_version 2)")
    branches: list[LayerBranches] | None = Field(default=None, description="after a sub-layer cut: for each layer, "
                                                 "the original layers of its attention and its MLP (format_version 2)")
    zero_partners: int = Field(default=0, ge=0, description="branches of the written checkpoint whose weights are "
                               "zero, standing in for a removed branch beside a kept one (format_version 2)")
    format: Literal["decilm"] | None = Field(default=None, description="the checkpoint's layout where it is not the "
                                             "source architecture's: decilm (DeciLMForCausalLM, block_configs; "
                                             "format_version 2)")
    replaced_blocks: list[ReplacedBlock] = []
    healing: list[HealingEntry] = []
    repairs: list[RepairEntry] = []
    reason: str | None = None
    recipe: dict[str, Any] | None = None
    gguf: GgufExport | None = Field(default=None, description="present for a GGUF export (--format gguf)")
    num_layers: int = Field(ge=1)
    parameters: int = Field(ge=0)
    model_type: str
    versions: dict[str, str]
    date: str


def checked_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` validated as a :class:`ProvenanceRecord`, as the JSON it is written as (with
    ``format_version``); a record that does not fit is a bug in the writer, so it raises."""
    return checked(ProvenanceRecord, record)


def read_record(path: Path) -> dict[str, Any]:
    """The lineage in ``path`` (a ``layerprune.json``), refused with the fix if it is not one this
    version can read; a record from before ``format_version`` reads as version 1."""
    return read_checked(path, ProvenanceRecord, "delete or fix it")
