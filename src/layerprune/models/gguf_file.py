"""Writing GGUF files (llama.cpp's format), and removing layers from one without loading it.

A GGUF file is a header of typed key/value metadata (architecture hyper-parameters, the tokenizer,
the chat template), a table of tensors (name, shape, quantization type, offset) and the tensors'
bytes. Removing whole decoder layers changes none of the kept bytes: :func:`prune_gguf` drops the
``blk.<i>.*`` tensors of the removed layers, renumbers the others, sets ``block_count``, cuts every
per-layer metadata array to the kept layers, and copies each kept tensor's byte range from the
source file with ``os.copy_file_range`` (:func:`~layerprune.models.shards.copy_range`): every kept
tensor stays in its own quantization, bit for bit, and memory stays a small constant whatever the
file's size (the tensor table is read by :class:`gguf.GGUFReader` over a read-only memory map whose
data pages are never touched). llama.cpp's own ``llama-quantize --prune-layers`` does the same cut.

Names, keys and quantization types come from the ``gguf`` package's tables (``gguf.Keys``,
``gguf.TENSOR_NAMES``, ``gguf.MODEL_ARCH_NAMES``, ``gguf.quants``), not from lists kept here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from layerprune.errors import UsageError
from layerprune.models.export import SAFETY_MARGIN_BYTES, provenance_json, render_model_card
from layerprune.models.lineage import PROVENANCE_FILE, apply_removal, describe_result, new_lineage, read_lineage
from layerprune.models.shards import copy_range
from layerprune.models.surgery import validate_layer_indices
from layerprune.outputs import atomic_output_dir, check_free_space, check_output_path

GGUF_FILE = "model.gguf"
"""The one weight file of a GGUF export; ``layerprune.json`` and the model card lie beside it."""

RECORD_KEY = "layerprune.record"
"""The GGUF metadata key that holds the same record as ``layerprune.json`` (a JSON string)."""

ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
"""transformers ``model_type`` -> llama.cpp architecture, for the families whose GGUF files layerprune
writes and reads back (covered: the tensors map by gguf's own name table, the hyper-parameters by
transformers' GGUF config table, and llama.cpp runs the result). Other families llama.cpp reads
(phi3's fused projections, gemma2's soft-capping keys, gpt2, command-r, ...) are refused."""

_SWA_DEFAULT_PERIOD = {"gemma3": 6}
"""llama.cpp's own sliding-window period for an architecture whose file gives none (one full-attention
layer per period, last in it): a cut file must spell the kept layers' pattern out, or llama.cpp would
apply the period to the renumbered layers."""

_LAYER_PREFIX = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_NORM].split("{bid}")[0]  # "blk."
_LAYER_NAME = re.compile(rf"^{re.escape(_LAYER_PREFIX)}(\d+)\.(.+)$")


def architecture_of(model_type: str) -> str:
    """The llama.cpp architecture layerprune writes for ``model_type``, or the refusal naming those covered."""
    if model_type not in ARCHITECTURES:
        raise UsageError(f"layerprune writes GGUF for {', '.join(sorted(ARCHITECTURES))} models, not "
                         f"{model_type!r}; export it with --format transformers (and convert it with llama.cpp's "
                         "convert_hf_to_gguf.py if llama.cpp reads it)")
    return ARCHITECTURES[model_type]


def model_type_of(architecture: str) -> str:
    """The transformers ``model_type`` of a GGUF file's architecture, refused if layerprune does not cover it."""
    for model_type, arch in ARCHITECTURES.items():
        if arch == architecture:
            return model_type
    raise UsageError(f"layerprune writes GGUF for the {', '.join(sorted(set(ARCHITECTURES.values())))} "
                     f"architectures, not {architecture!r}; load the file and export it with --format transformers")


def model_arch(architecture: str) -> gguf.MODEL_ARCH:
    """gguf's enum member for an architecture name (the key of its tensor name tables)."""
    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)


@dataclass(frozen=True)
class Metadata:
    """One key/value of a GGUF header, as :meth:`gguf.GGUFWriter.add_key_value` takes it."""

    key: str
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@dataclass(frozen=True)
class TensorOut:
    """One tensor of the file to write: its bytes are either a range of a source file (copied as they
    are) or an array made when its turn comes (so only one changed tensor is in memory at a time)."""

    name: str
    shape: tuple[int, ...]
    """in numpy (row-major) order, the reverse of GGUF's dimension order"""
    type: gguf.GGMLQuantizationType
    nbytes: int
    source: tuple[Path, int] | None = None
    """(file, absolute offset) of the bytes to copy"""
    make: Callable[[], np.ndarray] | None = None
    """the encoded tensor (uint8 blocks or a float array) when it is not copied"""


def read_fields(reader: gguf.GGUFReader) -> list[Metadata]:
    """Every key/value of ``reader``'s header except the ones a writer sets itself (the GGUF header's
    own counts and the architecture, which :class:`gguf.GGUFWriter` writes first)."""
    fields = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields.append(Metadata(field.name, field.contents(), kind, sub_type))
    return fields


def field_value(fields: Iterable[Metadata], key: str) -> Any:
    return next((field.value for field in fields if field.key == key), None)


def cut_layer_fields(fields: list[Metadata], architecture: str, source_layers: int, kept: Sequence[int]) -> list[Metadata]:
    """The header of a file that holds source layers ``kept`` (in this order): ``block_count`` set, and
    every per-layer array of the architecture (an array under ``<arch>.`` with one entry per source
    layer: sliding-window patterns, per-layer head counts or widths) cut to the kept layers. An
    architecture whose sliding-window pattern is llama.cpp's default period gets it spelled out."""
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture)
    pattern_key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=architecture)
    out = []
    for field in fields:
        if field.key == block_count:
            field = Metadata(field.key, len(kept), field.type)
        elif (field.key.startswith(f"{architecture}.") and field.type == gguf.GGUFValueType.ARRAY
              and isinstance(field.value, list) and len(field.value) == source_layers):
            field = Metadata(field.key, [field.value[i] for i in kept], field.type, field.sub_type)
        elif field.key == pattern_key and not isinstance(field.value, list):  # a period: spell it out
            field = _swa_pattern(pattern_key, int(field.value), kept)
        out.append(field)
    sliding = field_value(fields, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=architecture))
    if architecture in _SWA_DEFAULT_PERIOD and sliding and field_value(fields, pattern_key) is None:
        out.append(_swa_pattern(pattern_key, _SWA_DEFAULT_PERIOD[architecture], kept))
    return out


def _swa_pattern(key: str, period: int, kept: Sequence[int]) -> Metadata:
    """llama.cpp's per-layer sliding flags for period ``period`` (the last layer of each period is full)."""
    return Metadata(key, [index % period < period - 1 for index in kept], gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.BOOL)


def record_field(record: dict[str, Any]) -> Metadata:
    return Metadata(RECORD_KEY, json.dumps(record, sort_keys=True), gguf.GGUFValueType.STRING)


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, rest) of a per-layer tensor name ``blk.<i>.<rest>``; None for a global tensor."""
    match = _LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_name(index: int, rest: str) -> str:
    return f"{_LAYER_PREFIX}{index}.{rest}"


def write_gguf(path: Path, architecture: str, fields: Iterable[Metadata], tensors: Sequence[TensorOut]) -> None:
    """Write a GGUF file: header, metadata and tensor table with :class:`gguf.GGUFWriter`, then each
    tensor's bytes, copied from its source file or encoded, at the file's alignment."""
    writer = gguf.GGUFWriter(path, architecture)
    for field in fields:
        if field.key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.value)
        writer.add_key_value(field.key, field.value, field.type, field.sub_type)
    for tensor in tensors:  # a float dtype makes the writer take the shape as given, in numpy order
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    target = writer.fout[0]
    sources: dict[Path, Any] = {}
    try:
        for tensor in tensors:
            writer.write_padding(target, target.tell())
            if tensor.source is not None:
                file, offset = tensor.source
                handle = sources.get(file) or sources.setdefault(file, file.open("rb"))
                target.flush()
                copy_range(handle, target, offset, tensor.nbytes)
            else:
                assert tensor.make is not None, "a tensor is either copied or made"
                data = np.ascontiguousarray(tensor.make())
                if data.nbytes != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: {data.nbytes} bytes encoded, {tensor.nbytes} planned")
                target.write(data.tobytes())
            writer.write_padding(target, tensor.nbytes)
    finally:
        for handle in sources.values():
            handle.close()
        writer.close()


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader over ``path`` (a read-only memory map), or a one-line refusal of a file that is not GGUF."""
    if not path.is_file():
        raise UsageError(f"GGUF file {path} does not exist; check the path")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise UsageError(f"cannot read GGUF file {path}: {error}; is it a complete GGUF file?") from None


def source_architecture(reader: gguf.GGUFReader) -> str:
    return str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())


def source_block_count(reader: gguf.GGUFReader, architecture: str) -> int:
    field = reader.fields.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture))
    if field is None:
        raise UsageError(f"the GGUF file has no {architecture}.block_count; is it a complete model file?")
    return int(field.contents())


def prune_gguf(source: str | Path, layers: Iterable[int], out: str | Path, *, overwrite: bool = False,
               source_name: str | None = None, reason: str = "layers named by the user",
               recipe: dict[str, Any] | None = None) -> Path:
    """Remove ``layers`` from the GGUF file ``source`` and write ``out/model.gguf`` (with ``layerprune.json``
    and the model card beside it) without loading the model: every kept tensor is copied byte for byte
    in its own quantization, renumbered, and the header cut to match (:func:`cut_layer_fields`)."""
    path = Path(source).expanduser().resolve()
    target = check_output_path(out, overwrite=overwrite, protected=[path])
    reader = open_gguf(path)
    architecture = source_architecture(reader)
    model_type = model_type_of(architecture)
    total = source_block_count(reader, architecture)
    removed = sorted(set(layers))
    validate_layer_indices(removed, total)
    kept = [index for index in range(total) if index not in set(removed)]
    tensors, parameters_before = [], 0
    for tensor in reader.tensors:
        parameters_before += int(tensor.n_elements)
        where = layer_of(tensor.name)
        if where is not None and where[0] in removed:
            continue
        name = tensor.name if where is None else layer_name(kept.index(where[0]), where[1])
        tensors.append(TensorOut(name, tuple(int(d) for d in reversed(tensor.shape)), tensor.tensor_type,
                                 int(tensor.n_bytes), source=(path, int(tensor.data_offset))))
    parameters_after = parameters_before - sum(int(t.n_elements) for t in reader.tensors
                                               if (layer_of(t.name) or (-1,))[0] in removed)
    lineage = read_lineage(path.parent)  # a file layerprune cut before: indices map back to the original
    if "kept_layers" not in lineage:
        lineage.update(new_lineage(source_name or str(path), total, parameters_before))
    lineage.pop("gguf", None)
    apply_removal(lineage, list(lineage["kept_layers"]), removed, reason)
    record = describe_result({**lineage, "gguf": gguf_record(architecture, str(path), tensors, copied=True)},
                             len(kept), parameters_after, model_type, recipe)
    fields = cut_layer_fields([f for f in read_fields(reader) if f.key != RECORD_KEY], architecture, total, kept)
    check_free_space(target.parent, sum(t.nbytes for t in tensors) + SAFETY_MARGIN_BYTES)
    with atomic_output_dir(target, overwrite=overwrite, protected=[path]) as staging:
        write_gguf(staging / GGUF_FILE, architecture, [*fields, record_field(record)], tensors)
        (staging / PROVENANCE_FILE).write_text(provenance_json(record))
        (staging / "README.md").write_text(render_model_card(record, out))
    return target


def gguf_record(architecture: str, source: str | None, tensors: Sequence[TensorOut], *, copied: bool | Sequence[str]) -> dict[str, Any]:
    """The ``gguf`` entry of ``layerprune.json``: the file, its architecture, its source file, and for
    every tensor its type and whether its bytes were copied from the source or quantized here."""
    copied_names = {t.name for t in tensors} if copied is True else set(copied or ())
    return {"file": GGUF_FILE, "architecture": architecture, "source_file": source,
            "tensors": {t.name: {"type": t.type.name, "written": "copied" if t.name in copied_names else "quantized"}
                        for t in tensors}}
