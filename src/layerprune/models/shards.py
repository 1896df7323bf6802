"""Shard surgery: remove decoder layers from a safetensors checkpoint without loading the model.

A 405B checkpoint does not fit in memory, but removing layers never needs the weights' values:
it drops the tensors of the removed layers, renames ``<layers>.<i>.`` to the new index, and cuts
the config. This module does exactly that on the files. It reads each shard's header (8-byte
length + JSON), writes a new header, and copies the kept tensors' byte ranges from the old shard to
the new one with ``os.copy_file_range`` (the kernel copies, nothing is mapped into this process;
where that is unavailable, in fixed 8 MiB chunks). Peak memory is therefore a small constant
whatever the size of the shards, and every kept tensor is the same bytes as in the input, so the
result equals the in-memory path (``layerprune.prune`` + ``layerprune.save``) tensor for tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from transformers import PretrainedConfig

from layerprune.errors import UsageError, mention
from layerprune.models.architectures import ADAPTERS, ArchitectureAdapter, adapter_for_config
from layerprune.models.checkpoint import INDEX_FILE, MAX_HEADER_BYTES, SINGLE_FILE, read_config, weight_map
from layerprune.models.export import SAFETY_MARGIN_BYTES, provenance_json, render_model_card
from layerprune.models.lineage import PROVENANCE_FILE, apply_removal, describe_result, new_lineage, read_lineage
from layerprune.models.surgery import cut_layer_config, validate_layer_indices
from layerprune.outputs import atomic_output_dir, check_free_space, check_output_path

_REWRITTEN = {"config.json", SINGLE_FILE, INDEX_FILE, PROVENANCE_FILE, "README.md"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_COPY_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: its byte range ``[start, end)`` counted from the shard's data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ShardHeader:
    """What a safetensors file holds, read from its header alone."""

    path: Path
    data_start: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None


def read_header(path: Path) -> ShardHeader:
    """Parse ``path``'s header (tensors in the order of their bytes), or say the file is broken."""
    broken = f"{path} is not a valid safetensors file"
    fix = "are the weight files intact? download the checkpoint again"
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise UsageError(f"{broken} (header of {length} bytes); {fix}")
            raw = json.loads(handle.read(length))
    except FileNotFoundError:
        raise UsageError(f"weight file {path} is missing; {fix}") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{broken} (unreadable header); {fix}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{broken} (header is not a JSON object); {fix}")
    metadata = raw.pop("__metadata__", None)
    try:
        tensors = sorted(
            (TensorEntry(name, info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for name, info in raw.items()),
            key=lambda entry: entry.start,
        )
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{broken} (malformed tensor entry); {fix}") from None
    data_start = 8 + length
    size = path.stat().st_size
    if any(t.end < t.start or t.end + data_start > size for t in tensors):
        raise UsageError(f"{broken} (truncated: tensors end past the file's {size} bytes); {fix}")
    return ShardHeader(path, data_start, tuple(tensors), metadata)


def checkpoint_shards(folder: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The weight files of a safetensors checkpoint folder, and its index if it is sharded."""
    mapping = weight_map(folder)
    if mapping is not None:
        return [folder / name for name in sorted(set(mapping.values()))], json.loads((folder / INDEX_FILE).read_text())
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    raise UsageError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}; shard surgery needs a safetensors "
                     "checkpoint folder (leave out --low-memory to load other formats)")


def is_safetensors_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a local checkpoint that shard surgery can work on."""
    return (folder / "config.json").is_file() and ((folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file())


_LAYER_KEY = r"^{prefix}\.(\d+)\.(.+)$"


def layer_key_prefix(names: Iterable[str], layers_path: str) -> str:
    """The prefix before ``<i>.`` that the checkpoint's own tensor names use for decoder layers.

    It is usually the module path (``model.layers``) but need not be: a GPT-2 base checkpoint
    names its layers ``h.0.`` although the causal-LM module path is ``transformer.h``. The longest
    suffix of the module path that some tensor name uses wins.
    """
    names = list(names)
    parts = layers_path.split(".")
    for first in range(len(parts)):
        prefix = ".".join(parts[first:])
        pattern = re.compile(_LAYER_KEY.format(prefix=re.escape(prefix)))
        if any(pattern.match(name) for name in names):
            return prefix
    raise UsageError(f"no tensor of this checkpoint is named like {layers_path}.<i>.*; is it a complete "
                     "checkpoint of the model its config.json describes?")


def _renamer(prefix: str, kept: list[int]) -> Callable[[str], str | None]:
    """Map a tensor name to its new name, or to None if it belongs to a removed layer."""
    pattern = re.compile(_LAYER_KEY.format(prefix=re.escape(prefix)))
    new_index = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        match = pattern.match(name)
        if match is None:
            return name
        old = int(match.group(1))
        return f"{prefix}.{new_index[old]}.{match.group(2)}" if old in new_index else None

    return rename


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: which input byte ranges go where, and its new header."""

    source: ShardHeader
    entries: tuple[tuple[TensorEntry, str], ...]  # (input tensor, its new name), in byte order

    @property
    def data_bytes(self) -> int:
        return sum(entry.end - entry.start for entry, _ in self.entries)

    def header_bytes(self) -> bytes:
        """The safetensors header: JSON padded with spaces to a multiple of 8, as the library writes it."""
        header: dict[str, Any] = {}
        if self.source.metadata is not None:
            header["__metadata__"] = self.source.metadata
        offset = 0
        for entry, name in self.entries:
            size = entry.end - entry.start
            header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)


def copy_range(source: BinaryIO, target: BinaryIO, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``source`` from ``offset`` to ``target`` in constant memory."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while count > 0 and copy_file_range is not None:
        try:
            done = copy_file_range(source.fileno(), target.fileno(), min(count, 2**30), offset)
        except OSError:  # cross-device on old kernels, unsupported file systems: copy by hand
            break
        if done == 0:
            raise UsageError(f"{source.name} ended early; download the checkpoint again")
        offset, count = offset + done, count - done
    source.seek(offset)
    while count > 0:
        chunk = source.read(min(count, _COPY_CHUNK))
        if not chunk:
            raise UsageError(f"{source.name} ended early; download the checkpoint again")
        target.write(chunk)
        count -= len(chunk)


def write_shard(plan: ShardPlan, path: Path) -> None:
    """Write ``plan`` to ``path``: header, then the kept byte ranges, adjacent ranges copied at once."""
    header = plan.header_bytes()
    with plan.source.path.open("rb") as source, path.open("wb") as target:
        target.write(struct.pack("<Q", len(header)))
        target.write(header)
        target.flush()
        for start, end in _merged_ranges(plan.entries):
            copy_range(source, target, plan.source.data_start + start, end - start)


def _merged_ranges(entries: Iterable[tuple[TensorEntry, str]]) -> Iterator[tuple[int, int]]:
    current: list[int] | None = None
    for entry, _ in entries:
        if current is not None and entry.start == current[1]:
            current[1] = entry.end
            continue
        if current is not None:
            yield current[0], current[1]
        current = [entry.start, entry.end]
    if current is not None:
        yield current[0], current[1]


@dataclass(frozen=True)
class CheckpointPlan:
    """Everything shard surgery will write, computed from headers before any byte is copied."""

    folder: Path
    config: PretrainedConfig
    adapter: ArchitectureAdapter
    removed: list[int]
    kept: list[int]
    shards: list[ShardPlan]
    index: dict[str, Any] | None
    parameters_before: int
    parameters_after: int


def load_checkpoint_config(folder: Path) -> tuple[PretrainedConfig, ArchitectureAdapter]:
    """The config of a checkpoint folder and its family's adapter, refusing what shard surgery cannot do."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json); shard surgery needs a local "
                         "safetensors checkpoint folder")
    config = read_config(folder)
    if config.model_type not in ADAPTERS:
        raise UsageError(f"shard surgery needs a registered family and {config.model_type!r} is not one "
                         f"({', '.join(ADAPTERS.names())}); leave out {mention('low_memory')} to prune it in memory")
    adapter = adapter_for_config(config)
    adapter.check_surgery_allowed(config)
    return config, adapter


def plan_removal(folder: str | Path, layers: Iterable[int]) -> CheckpointPlan:
    """Read config and headers, check ``layers`` against them, and plan every output shard."""
    folder = Path(folder).expanduser().resolve()
    config, adapter = load_checkpoint_config(folder)
    num_layers = config.num_hidden_layers
    removed = validate_layer_indices(layers, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    paths, index = checkpoint_shards(folder)
    headers = [read_header(path) for path in paths]
    names = [t.name for h in headers for t in h.tensors]
    prefix = layer_key_prefix(names, adapter.layers)
    pattern = re.compile(_LAYER_KEY.format(prefix=re.escape(prefix)))
    found = sorted({int(m.group(1)) for m in map(pattern.match, names) if m})
    if found != list(range(num_layers)):
        raise UsageError(f"config.json says {num_layers} layers but the weight files hold layers "
                         f"{found[:3]}...{found[-3:]} ({len(found)}); the checkpoint is inconsistent, download it again")
    rename = _renamer(prefix, kept)
    shards = [ShardPlan(h, tuple((t, new) for t in h.tensors if (new := rename(t.name)) is not None)) for h in headers]
    cut_layer_config(config, adapter, kept, num_layers)
    return CheckpointPlan(
        folder, config, adapter, removed, kept, [s for s in shards if s.entries], index,
        parameters_before=sum(t.numel for h in headers for t in h.tensors),
        parameters_after=sum(t.numel for s in shards for t, _ in s.entries),
    )


def _shard_names(plan: CheckpointPlan) -> list[str]:
    if plan.index is None:
        return [SINGLE_FILE]
    count = len(plan.shards)
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _new_index(plan: CheckpointPlan, names: list[str]) -> dict[str, Any]:
    assert plan.index is not None
    metadata = dict(plan.index.get("metadata") or {})
    metadata["total_size"] = sum(s.data_bytes for s in plan.shards)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = plan.parameters_after
    weight_map = {new: name for shard, name in zip(plan.shards, names) for _, new in shard.entries}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _side_files(folder: Path) -> list[Path]:
    """Tokenizer, generation config, chat template...: every top-level file that is not weights
    and not rewritten here (sub-folders such as ``original/`` hold other formats and are skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name not in _REWRITTEN and not p.name.endswith(_WEIGHT_SUFFIXES)
    )


def prune_checkpoint(
    folder: str | Path,
    layers: Iterable[int],
    out: str | Path,
    *,
    overwrite: bool = False,
    source_name: str | None = None,
    reason: str = "layers named by the user",
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Remove ``layers`` from the safetensors checkpoint in ``folder`` and write the result to ``out``.

    The output is what ``layerprune.prune`` + ``layerprune.save`` write for the same checkpoint
    (same tensors, bit for bit, same config, ``layerprune.json`` and model card), in the input's
    dtype, with the input's shard layout minus the removed tensors. ``source_name`` is what the
    provenance calls the input (the alias or path the user gave); by default the folder.
    """
    source = Path(folder).expanduser().resolve()
    target = check_output_path(out, overwrite=overwrite, protected=[source])
    plan = plan_removal(source, layers)
    check_free_space(target.parent, sum(s.data_bytes for s in plan.shards) + SAFETY_MARGIN_BYTES)
    lineage = read_lineage(source)  # a pruned input: indices map back to the original model
    if "kept_layers" not in lineage:
        lineage.update(new_lineage(source_name or str(source), len(plan.kept) + len(plan.removed),
                                   plan.parameters_before))
    apply_removal(lineage, list(lineage["kept_layers"]), plan.removed, reason)
    record = describe_result(lineage, len(plan.kept), plan.parameters_after, plan.config.model_type, recipe)
    names = _shard_names(plan)
    with atomic_output_dir(target, overwrite=overwrite, protected=[source]) as staging:
        for shard, name in zip(plan.shards, names):
            write_shard(shard, staging / name)
        if plan.index is not None:
            (staging / INDEX_FILE).write_text(json.dumps(_new_index(plan, names), indent=2, sort_keys=True) + "\n")
        plan.config.save_pretrained(staging)
        for path in _side_files(source):
            shutil.copy2(path, staging / path.name)
        (staging / PROVENANCE_FILE).write_text(provenance_json(record))
        (staging / "README.md").write_text(render_model_card(record, out))
    return target
